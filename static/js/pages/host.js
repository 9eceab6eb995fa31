// @ts-check
/**
 * `/hosts/<id>/`: one host, live. Status from `host_status`; charts from the per-minute
 * history (`GET /api/hosts/<id>/metrics/`) then `host_metrics`; the host's active alerts
 * (`GET /api/alerts/`, then `system_alerts`); a command console (`command` on
 * `command_execution`, results also from its events) and package operations (`command` on
 * `package_operations`, with progress from its events).
 *
 * Events published while the page was disconnected are replayed to it like live ones.
 * When they were lost, each part rebuilds: the status from its snapshot, the charts from
 * the history of the gap, alerts, commands and operations from their snapshots or else the
 * REST API.
 */
import { AlertTable, alertFromApi, alertFromEvent } from "./alerts-ui.js";
import { LineChart } from "./chart.js";
import {
  describeError, el, formatNumber, getJSON, onRebuild, pageData, showNotice, startLive, StreamRebuild, timeElement,
} from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */
/** @typedef {import("../sysmanage-client.js").SysManageError} SysManageError */
/** @typedef {import("../sysmanage-client.js").ResumeReport} ResumeReport */

const data = pageData();
const hostId = data.hostId;
const HISTORY_LIMIT = 10;
/** Final states of a command execution. */
const FINAL_COMMAND_STATES = ["completed", "failed", "timeout"];

const client = startLive();

// -- status -------------------------------------------------------------------------------

/** @type {Record<string, string>} */
const STATUS_WORDS = { online: "Online", offline: "Offline", unknown: "Unknown" };
let lastSeenIso = data.lastSeen;

client.subscribe("host_status", { host_id: hostId }, (change, message) => {
  if (message.type === "status") {
    const host = change.hosts.find((/** @type {JsonObject} */ h) => h.host_id === hostId);
    if (host) showStatus(host.status, host.last_seen);
  } else {
    showStatus(change.status, change.status === "online" ? change.timestamp : null);
    const was = change.previous_status ? ` (was ${change.previous_status})` : "";
    showNotice(`${data.hostname} is ${change.status}${was}.`, { kind: change.status === "online" ? "ok" : "warn", key: "host-status" });
  }
});

/**
 * @param {string} status
 * @param {string|null} iso
 */
function showStatus(status, iso) {
  if (iso) lastSeenIso = iso;
  /** @type {HTMLElement} */ (document.getElementById("host-status")).replaceChildren(
    el("span", { className: `badge status-${status}` }, STATUS_WORDS[status] || status));
  /** @type {HTMLElement} */ (document.getElementById("host-last-seen")).replaceChildren(status === "online"
    ? el("span", { className: "seen-now", title: "The agent is connected and reporting" }, "now")
    : timeElement(lastSeenIso, "never"));
  /** @type {NodeListOf<HTMLElement>} */ (document.querySelectorAll(".host-offline-hint")).forEach((hint) => { hint.hidden = status === "online"; });
}

// -- charts -------------------------------------------------------------------------------

/** @param {string} name */
const figure = (name) => /** @type {HTMLElement} */ (document.querySelector(`[data-chart="${name}"]`));
const charts = {
  cpu: new LineChart(figure("cpu"), { label: "CPU usage" }),
  memory: new LineChart(figure("memory"), { label: "Memory usage" }),
  disk: new LineChart(figure("disk"), { label: "Disk usage per mount point" }),
  load: new LineChart(figure("load"), {
    label: "Load average", max: null, unit: "", digits: 2,
    reference: data.cpuCount ? { value: data.cpuCount, label: `${data.cpuCount} CPUs` } : null,
  }),
};
const LOAD_NAMES = ["1 min", "5 min", "15 min"];

/**
 * Add one set of metrics (a live report or a history minute) at `time` (epoch ms).
 * @param {number} time
 * @param {JsonObject} metrics
 */
function plot(time, metrics) {
  charts.cpu.add("cpu", time, metrics.cpu_usage, "CPU");
  charts.memory.add("memory", time, metrics.memory_usage, "Memory");
  for (const [mount, percent] of Object.entries(metrics.disk_usage || {})) charts.disk.add(mount, time, percent);
  /** @type {number[]} */ (metrics.load_average || []).forEach((value, i) => charts.load.add(LOAD_NAMES[i], time, value));
}

client.subscribe("host_metrics", { host_id: hostId }, ({ timestamp, metrics }) => {
  plot(Date.parse(timestamp), metrics || {});
});

/** The last hour, one averaged point per minute (drawn mid-minute). */
async function loadHistory() {
  try {
    const history = await getJSON(`/api/hosts/${hostId}/metrics/?minutes=60`);
    for (const row of history.samples) plot(Date.parse(row.minute) + 30_000, row);
  } catch (err) {
    showNotice(`Could not load the metrics history: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "history" });
  }
}
loadHistory();

/**
 * Reports lost during a disconnect: plot the per-minute averages of the gap (the minutes
 * whose middle falls between the last report seen and the reconnection).
 * @param {ResumeReport} report
 */
async function backfillHistory({ from, to }) {
  if (!from || !to) return;
  const [start, end] = [Date.parse(from), Date.parse(to)];
  try {
    const history = await getJSON(`/api/hosts/${hostId}/metrics/?${new URLSearchParams({ since: from, until: to })}`);
    for (const row of history.samples) {
      const time = Date.parse(row.minute) + 30_000;
      if (time > start && time < end) plot(time, row);
    }
  } catch (err) {
    showNotice(`Could not fill the gap in the charts: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "history" });
  }
}
onRebuild(client, "host_metrics", backfillHistory);

// -- alerts -------------------------------------------------------------------------------

const alertTable = new AlertTable({
  tbody: /** @type {HTMLTableSectionElement} */ (document.getElementById("alert-rows")),
  empty: /** @type {HTMLElement} */ (document.getElementById("alerts-empty")),
  showHost: false,
  canManage: data.canManageAlerts,
  states: ["open", "acknowledged"],
});
if (data.canManageAlerts) alertTable.bindActions(client);

/**
 * Read the host's active alerts: all of them at first, and again when changes were lost.
 * @param {{initial: boolean}} options `initial`: the table starts from them
 */
async function loadAlerts({ initial }) {
  const empty = /** @type {HTMLElement} */ (document.getElementById("alerts-empty"));
  try {
    const page = await getJSON(`/api/alerts/?host=${hostId}&status=open,acknowledged&limit=200`);
    const alerts = page.results.map(alertFromApi);
    if (initial) alertTable.replaceAll(alerts);
    else alertTable.sync(alerts, { complete: true });
    empty.textContent = "No open alerts for this host.";
  } catch (err) {
    empty.textContent = `Could not load the alerts: ${/** @type {Error} */ (err).message}`;
    empty.hidden = false;
  }
}

// Lost changes: the snapshot lists the host's current alerts; without one, the REST API.
const alertsRebuild = new StreamRebuild(client, "system_alerts", {
  fromSnapshot: (snapshot) => {
    if (!Array.isArray(snapshot.alerts)) return false;
    alertTable.sync(snapshot.alerts.map(alertFromEvent), { complete: true });
    return true;
  },
  fromRest: () => loadAlerts({ initial: false }),
});
const alertsSubscription = client.subscribe("system_alerts", { host_id: hostId }, (alert, message) => {
  if (message.type === "status") alertsRebuild.snapshot(alert);
  else alertsRebuild.apply(() => alertTable.apply(alert));
});
const loadAllAlerts = () => loadAlerts({ initial: true });
alertsSubscription.ready.then(loadAllAlerts, loadAllAlerts); // subscribed first: no change falls in between

// -- command console --------------------------------------------------------------------------

const consoleForm = /** @type {HTMLFormElement} */ (document.getElementById("console-form"));
const commandInput = /** @type {HTMLTextAreaElement} */ (document.getElementById("console-command"));
const timeoutInput = /** @type {HTMLInputElement} */ (document.getElementById("console-timeout"));
const consoleHistory = /** @type {HTMLOListElement} */ (document.getElementById("console-history"));

commandInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    consoleForm.requestSubmit();
  }
});

consoleForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const command = commandInput.value.trim();
  const timeout = Number(timeoutInput.value);
  if (!command || !Number.isInteger(timeout) || timeout < 1 || timeout > 3600) {
    consoleForm.reportValidity();
    return;
  }
  const entry = commandEntry(command, timeout);
  try {
    const result = await client.command("command_execution", { host_id: hostId, command, timeout });
    entry.executionId = result.execution_id ?? entry.executionId;
    showResult(entry, result);
  } catch (err) {
    const error = /** @type {SysManageError} */ (err);
    if (error.data?.execution_id) entry.executionId = error.data.execution_id;
    showCommandError(entry, error);
  }
});

/**
 * A command of this page: its list item and the parts that change, the execution it
 * became (from the response, an event, or a snapshot), and whether its outcome is shown.
 * @typedef {{item: HTMLLIElement, badge: HTMLSpanElement, meta: HTMLSpanElement,
 *            body: HTMLDivElement, command: string, executionId: string|null,
 *            done: boolean}} CommandEntry
 */

/** @type {CommandEntry[]} this page's commands, newest first */
let commandEntries = [];

/**
 * A new history item, newest first, at most HISTORY_LIMIT of them.
 * @param {string} command
 * @param {number} timeout
 * @returns {CommandEntry}
 */
function commandEntry(command, timeout) {
  const badge = el("span", { className: "badge status-running" }, "Running…");
  const meta = el("span", { className: "history-meta" }, `timeout ${timeout} s · started `, timeElement(new Date().toISOString()));
  const again = el("button", {
    type: "button", className: "link-button", disabled: !data.canRunCommands,
    onclick: () => { commandInput.value = command; timeoutInput.value = String(timeout); commandInput.focus(); },
  }, "Edit again");
  const body = el("div", { className: "history-body" });
  const item = el("li", { ariaBusy: "true" },
    el("div", { className: "history-head" }, el("span", { className: "history-command" }, command), badge, meta, again), body);
  consoleHistory.prepend(item);
  while (consoleHistory.children.length > HISTORY_LIMIT) /** @type {Element} */ (consoleHistory.lastElementChild).remove();
  /** @type {HTMLElement} */ (document.getElementById("console-empty")).hidden = true;
  /** @type {CommandEntry} */
  const entry = { item, badge, meta, body, command, executionId: null, done: false };
  commandEntries = [entry, ...commandEntries.filter((e) => e.item.isConnected)];
  return entry;
}

/** @type {Record<string, string>} */
const RESULT_WORDS = { failed: "Not run", timeout: "Timed out", pending: "Pending", running: "Running" };

/**
 * Show a command's result: exit status, time, stdout and stderr, or why it did not run.
 * Shown once; a later copy (the response after the final event, or a replay) changes nothing.
 * @param {CommandEntry} entry
 * @param {JsonObject} result the `data` of the command's response, or its final event
 */
function showResult(entry, result) {
  if (entry.done) return;
  entry.done = true;
  entry.item.removeAttribute("aria-busy");
  entry.body.replaceChildren(); // a note that the connection was lost, if any
  const ok = result.status === "completed" && result.exit_code === 0;
  const words = result.status === "completed" ? `Exit ${result.exit_code}` : RESULT_WORDS[result.status] || result.status;
  entry.badge.className = `badge status-${ok ? "completed" : "failed"}`;
  entry.badge.textContent = words;
  if (typeof result.execution_time === "number") entry.meta.append(` · took ${formatNumber(result.execution_time, 3)} s`);
  if (result.status === "failed") { // as COMMAND_FAILED says it, whichever arrives first
    entry.badge.className = "badge status-error";
    entry.body.append(el("p", { className: "error-text" }, `The command could not be run: ${result.error}`));
  } else if (result.error) entry.body.append(el("p", { className: "error-text" }, result.error));
  if (result.stdout) entry.body.append(el("p", { className: "output-label" }, "Output"), el("pre", { className: "output" }, result.stdout), ...cutNote(result, "stdout"));
  if (result.stderr) entry.body.append(el("p", { className: "output-label" }, "Errors"), el("pre", { className: "output output-stderr" }, result.stderr), ...cutNote(result, "stderr"));
  if (result.status === "completed" && !result.stdout && !result.stderr) entry.body.append(el("p", { className: "muted" }, "No output."));
}

/**
 * A note under an output that the agent or the server cut, with its whole size when known.
 * @param {JsonObject} result
 * @param {"stdout"|"stderr"} name
 * @returns {HTMLElement[]}
 */
function cutNote(result, name) {
  if (result[`${name}_truncated`] !== true) return [];
  const size = result[`${name}_bytes`];
  const whole = typeof size === "number" ? ` of ${formatNumber(size, 0)} bytes` : "";
  return [el("p", { className: "muted" }, `Only the start${whole} is kept.`)];
}

/** Errors after which the command may still run: its result can still arrive as an event. */
const UNSETTLED_ERRORS = ["DISCONNECTED", "TIMEOUT"];

/**
 * Show why a command was refused or lost, in words.
 * @param {CommandEntry} entry
 * @param {SysManageError} err
 */
function showCommandError(entry, err) {
  if (entry.done) return;
  if (UNSETTLED_ERRORS.includes(err.code)) {
    entry.badge.className = "badge status-error";
    entry.badge.textContent = err.code === "TIMEOUT" ? "No answer" : "Connection lost";
    entry.body.replaceChildren(el("p", { className: "error-text" },
      `${describeError(err)} If the command runs, its result appears here.`));
    return;
  }
  entry.done = true;
  entry.item.removeAttribute("aria-busy");
  entry.badge.className = "badge status-error";
  entry.badge.textContent = err.code === "PERMISSION_DENIED" ? "Not allowed"
    : err.code === "COMMAND_FAILED" ? "Not run" : "Error";
  const words = err.code === "COMMAND_FAILED" ? `The command could not be run: ${err.message}`
    : err.code === "PERMISSION_DENIED" ? "You are not allowed to run commands on hosts."
      : describeError(err);
  entry.body.replaceChildren(el("p", { className: "error-text" }, words));
}

/**
 * The entry of an execution: the one bound to it, or else the oldest of this page's
 * commands with the same text still waiting for its execution, when the execution is this
 * user's (the events of a command come before its response, and after a lost connection
 * they are all there is).
 * @param {JsonObject} execution a `command_execution` event or snapshot item
 * @returns {CommandEntry|undefined}
 */
function entryOf(execution) {
  const bound = commandEntries.find((e) => e.executionId === execution.execution_id);
  if (bound || execution.redacted || execution.requested_by !== data.username) return bound;
  const entry = [...commandEntries].reverse().find((e) => e.executionId === null && e.command === execution.command);
  if (entry) entry.executionId = execution.execution_id;
  return entry;
}

/**
 * A step of an execution (an event, live or replayed, or a snapshot item): a final one
 * shows the result in its entry.
 * @param {JsonObject} execution
 */
function followExecution(execution) {
  const entry = entryOf(execution);
  if (entry && (execution.final || FINAL_COMMAND_STATES.includes(execution.status))) showResult(entry, execution);
}

/**
 * When command events were lost: read this user's latest commands on the host and show
 * the results of the entries still waiting for theirs.
 */
async function refreshCommands() {
  if (!commandEntries.some((e) => !e.done)) return;
  const page = await getJSON(`/api/commands/?host=${encodeURIComponent(hostId)}&limit=50`);
  for (const listed of page.results.reverse()) {
    if (listed.requested_by !== data.username) continue;
    const entry = entryOf({ ...listed, execution_id: listed.id });
    if (!entry || entry.done || !FINAL_COMMAND_STATES.includes(listed.status)) continue;
    const whole = await getJSON(`/api/commands/${encodeURIComponent(listed.id)}/`); // the list cuts outputs short
    showResult(entry, { ...whole, execution_id: whole.id });
  }
}

const commandsRebuild = new StreamRebuild(client, "command_execution", {
  fromSnapshot: (snapshot) => {
    if (!Array.isArray(snapshot.commands)) return false;
    snapshot.commands.forEach(followExecution);
    return true;
  },
  fromRest: refreshCommands,
});
client.subscribe("command_execution", { host_id: hostId }, (execution, message) => {
  if (message.type === "status") commandsRebuild.snapshot(execution);
  else followExecution(execution);
});

// -- package operations ------------------------------------------------------------------------

/**
 * An operation's list item and the parts that change; `rank` orders its states.
 * @typedef {{item: HTMLLIElement, badge: HTMLSpanElement, bar: HTMLProgressElement,
 *            value: HTMLSpanElement, message: HTMLParagraphElement, rank: number}} OperationEntry
 */

const packageForm = /** @type {HTMLFormElement} */ (document.getElementById("package-form"));
const packageInput = /** @type {HTMLInputElement} */ (document.getElementById("package-name"));
const operationsList = /** @type {HTMLOListElement} */ (document.getElementById("package-operations"));
/** @type {Map<string, OperationEntry>} */
const operations = new Map(); // execution_id -> {item, ...parts, rank}
/** @type {Record<string, number>} */
const RANK = { pending: 0, in_progress: 1, completed: 2, failed: 2 };
/** @type {Record<string, string>} */
const OPERATION_WORDS = { install: "Install", remove: "Remove", update: "Update", upgrade: "Apply updates:", reboot: "Reboot" };
/** @type {Record<string, string>} */
const UPDATE_TARGETS = { "*": "all pending updates", "*security": "security updates" };
/** @type {Record<string, string>} */
const OPERATION_STATUS = { pending: "Pending", in_progress: "In progress", completed: "Completed", failed: "Failed" };

/**
 * Whether an operation the page does not show belongs on it after lost events: one still
 * under way, or one started after the page last heard from the channel (`since`).
 * @param {JsonObject} op an event, snapshot item or REST API operation
 * @param {string|null|undefined} since
 */
function startedDuringGap(op, since) {
  if (!op.final && RANK[op.status] !== 2) return true;
  const started = Date.parse(op.created_at ?? op.timestamp ?? "");
  return Boolean(since) && started > Date.parse(/** @type {string} */ (since));
}

/**
 * When events were lost: the snapshot's operations (those shown, and new ones).
 * @param {JsonObject} snapshot
 * @param {ResumeReport|null} report
 */
function operationsFromSnapshot(snapshot, report) {
  if (!Array.isArray(snapshot.operations)) return false;
  for (const op of snapshot.operations) {
    // a snapshot does not say when an operation started: its time is left out
    if (operations.has(op.execution_id) || startedDuringGap(op, report?.from)) showOperation(op, null);
  }
  return true;
}

/**
 * When events were lost and no snapshot says what happened: read the host's latest
 * operations and bring those shown up to date, adding the ones started meanwhile.
 * @param {ResumeReport|null} report
 */
async function refreshOperations(report) {
  try {
    const page = await getJSON(`/api/package-operations/?host=${encodeURIComponent(hostId)}&limit=50`);
    for (const op of page.results.reverse()) {
      if (operations.has(op.id) || startedDuringGap(op, report?.from)) showOperation({ ...op, execution_id: op.id });
    }
  } catch (err) {
    showNotice(`Could not refresh package operations: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "operations" });
  }
}

const operationsRebuild = new StreamRebuild(client, "package_operations", {
  fromSnapshot: operationsFromSnapshot, fromRest: refreshOperations,
});
client.subscribe("package_operations", { host_id: hostId }, (event, message) => {
  if (message.type === "status") operationsRebuild.snapshot(event);
  else operationsRebuild.apply(() => showOperation(event));
});

packageForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const operation = /** @type {HTMLButtonElement|null} */ (event.submitter)?.value || "install";
  const name = packageInput.value.trim();
  if (!packageInput.checkValidity() || !name) {
    packageForm.reportValidity();
    return;
  }
  const buttons = packageForm.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    showOperation(await client.command("package_operations", { host_id: hostId, operation, package: name }));
    packageInput.value = "";
  } catch (err) {
    if (UNSETTLED_ERRORS.includes(/** @type {SysManageError} */ (err).code)) { // it may have started
      showNotice(`${describeError(/** @type {SysManageError} */ (err))} If the operation started, it appears under “Operations on this host”.`,
        { kind: "warn", key: "operations" });
      return;
    }
    const message = /** @type {SysManageError} */ (err).code === "PERMISSION_DENIED" ? "You are not allowed to change packages on hosts."
      : /** @type {SysManageError} */ (err).code === "COMMAND_FAILED" ? `Not started: ${/** @type {SysManageError} */ (err).message}` : describeError(/** @type {SysManageError} */ (err));
    showOperation({
      execution_id: /** @type {SysManageError} */ (err).data?.execution_id || `local-${Date.now()}`, operation, package: name,
      status: "failed", progress: 0, message, final: true,
    });
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
});

/**
 * Create or advance an operation's entry (events may arrive before the command's answer;
 * steps seen again, or out of order, never move it back).
 * @param {JsonObject} op
 * @param {string|null} [started] when a new entry's operation started (null: not known)
 */
function showOperation(op, started = new Date().toISOString()) {
  let entry = operations.get(op.execution_id);
  if (!entry) {
    entry = operationEntry(op, op.created_at ?? started);
    operations.set(op.execution_id, entry);
  }
  const rank = RANK[op.status] ?? 0;
  if (rank < entry.rank) return;
  const progress = op.status === "completed" ? 100 : Math.max(0, Math.min(100, Number(op.progress) || 0));
  if (rank === entry.rank && progress < entry.bar.value) return; // an older step, seen again
  entry.rank = rank;
  if (op.progress !== undefined || op.status === "completed") {
    entry.bar.value = progress;
    entry.value.textContent = `${progress} %`;
  }
  entry.badge.className = `badge status-${op.status}`;
  entry.badge.textContent = OPERATION_STATUS[op.status] || op.status;
  if (op.message) entry.message.textContent = op.message;
  entry.item.setAttribute("aria-busy", String(rank < 2));
}

/**
 * @param {JsonObject} op
 * @param {string|null} started when it started (null: not known, the time is left out)
 * @returns {OperationEntry}
 */
function operationEntry(op, started) {
  const target = op.operation === "upgrade" ? (UPDATE_TARGETS[op.package] || op.package) : op.package;
  const title = `${OPERATION_WORDS[op.operation] || op.operation} ${target}`.trim();
  const parts = /** @type {OperationEntry} */ ({ // item: below
    badge: el("span", { className: "badge" }),
    bar: el("progress", { max: 100, value: 0, ariaLabel: `Progress of ${title}` }),
    value: el("span", { className: "progress-value", ariaHidden: "true" }, "0 %"),
    message: el("p", { className: "progress-message" }),
    rank: -1,
  });
  parts.item = el("li", {},
    el("div", { className: "history-head" }, el("span", { className: "history-command" }, title), parts.badge,
      started ? el("span", { className: "history-meta" }, "started ", timeElement(started)) : null),
    el("div", { className: "progress" }, parts.bar, parts.value),
    parts.message);
  operationsList.prepend(parts.item);
  while (operationsList.children.length > HISTORY_LIMIT) /** @type {Element} */ (operationsList.lastElementChild).remove();
  /** @type {HTMLElement} */ (document.getElementById("packages-empty")).hidden = true;
  return parts;
}

// -- updates and reboot ----------------------------------------------------------------

const checkButton = /** @type {HTMLButtonElement|null} */ (document.getElementById("check-updates"));
checkButton?.addEventListener("click", () => { void checkUpdates(checkButton); });
const applyButton = /** @type {HTMLButtonElement|null} */ (document.getElementById("apply-updates"));
applyButton?.addEventListener("click", () => {
  const which = /** @type {HTMLSelectElement} */ (document.getElementById("apply-which")).value;
  void hostAction(applyButton, "apply-updates", { which },
    which === "security" ? "Applying security updates." : "Applying all pending updates.");
});
const rebootButton = /** @type {HTMLButtonElement|null} */ (document.getElementById("reboot-host"));
rebootButton?.addEventListener("click", () => {
  if (!window.confirm(`Reboot ${data.hostname}? Every service on it stops until it is back.`)) return;
  void hostAction(rebootButton, "reboot", {}, "Rebooting: the reboot ends when the host is back online.");
});

/**
 * Apply updates or reboot (`POST /api/hosts/<id>/<path>/`); the operation then shows
 * among the package operations, live.
 * @param {HTMLButtonElement} button
 * @param {string} path
 * @param {Record<string, string>} body
 * @param {string} started what the notice says once the server took it
 */
async function hostAction(button, path, body, started) {
  const csrf = /** @type {HTMLInputElement|null} */ (document.querySelector("input[name=csrfmiddlewaretoken]"));
  button.disabled = true;
  try {
    const answer = await fetch(`/api/hosts/${data.hostId}/${path}/`, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrf ? csrf.value : "" },
      body: JSON.stringify(body),
    });
    if (!answer.ok) {
      const reply = await answer.json().catch(() => ({}));
      throw new Error(reply.detail || `The server answered ${answer.status} ${answer.statusText}.`);
    }
    showNotice(started, { kind: "info", key: path });
  } catch (error) {
    showNotice(`Could not ${path === "reboot" ? "reboot" : "apply updates"}: ${error instanceof Error ? error.message : String(error)}`,
      { kind: "warn", key: path });
  } finally {
    button.disabled = false;
  }
}

/**
 * Ask the host's agent for a fresh check of its updates (`POST /api/hosts/<id>/check-updates/`);
 * the page shows the new figures when reloaded after the agent reported.
 * @param {HTMLButtonElement} button
 */
async function checkUpdates(button) {
  const csrf = /** @type {HTMLInputElement|null} */ (document.querySelector("input[name=csrfmiddlewaretoken]"));
  button.disabled = true;
  try {
    const answer = await fetch(`/api/hosts/${data.hostId}/check-updates/`, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRFToken": csrf ? csrf.value : "" },
    });
    if (!answer.ok) throw new Error(`The server answered ${answer.status} ${answer.statusText}.`);
    showNotice("The agent was asked to check for updates. Reload the page in a minute to see what it found.",
      { kind: "info", key: "check-updates", action: { text: "Reload", run: () => location.reload() } });
  } catch (error) {
    showNotice(`Could not ask for a check: ${error instanceof Error ? error.message : String(error)}`,
      { kind: "warn", key: "check-updates" });
  } finally {
    button.disabled = false;
  }
}
