// @ts-check
/**
 * `/fleet-runs/<id>/`: one fleet run as it happens. Subscribes to `command_execution`
 * with the run's `run_id`: the snapshot and each progress event carry the run's counts
 * and state, and the events the hosts that started (shown running) and those that ended
 * since the previous one, which update their rows. If events were lost during a disconnect, or hosts ended between the page's
 * rendering and its subscription (the snapshot counts them but names no host), the run
 * is read again from `GET /api/fleet-runs/<id>/`.
 */
import { el, getJSON, onRebuild, pageData, showNotice, startLive } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

/** @type {Record<string, string>} */
const STATE_WORDS = {
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  stopped: "Stopped",
  interrupted: "Interrupted",
};
/** How a host of a run ends; a row that shows one of these never goes back. */
const ENDED = new Set(["succeeded", "failed", "skipped"]);

const runId = /** @type {string} */ (pageData().runId);
const stateNode = /** @type {HTMLElement} */ (document.getElementById("run-state"));
const reasonNode = /** @type {HTMLElement} */ (document.getElementById("run-reason"));
const tbody = /** @type {HTMLTableSectionElement} */ (document.getElementById("run-host-rows"));
const rows = new Map([...tbody.rows].map((row) => [row.dataset.hostId, row]));

const client = startLive();
client.subscribe("command_execution", { run_id: runId }, (data, message) => {
  if (message.type === "status") {
    if (data.fleet_run) {
      showRun(data.fleet_run);
      if (endedInRows() < endedIn(data.fleet_run)) void reload();
    }
  } else if (data.run_id === runId) {
    showRun(data);
    for (const host of data.started || []) showHost({ ...host, status: "running", exit_code: null, reason: "" });
    for (const result of data.results || []) showHost(result);
  }
});
onRebuild(client, "command_execution", () => void reload());

/**
 * The run's state, reason and counts.
 * @param {JsonObject} run
 */
function showRun(run) {
  stateNode.replaceChildren(
    el("span", { className: `badge run-state run-${run.state}` }, STATE_WORDS[run.state] || run.state),
  );
  reasonNode.textContent = run.reason || "";
  for (const [key, value] of Object.entries(run.counts || {})) {
    const node = document.querySelector(`#run-counts [data-count="${key}"]`);
    if (node) node.textContent = String(value);
  }
}

/**
 * One host's outcome, in its row.
 * @param {JsonObject} host
 */
function showHost(host) {
  const row = rows.get(host.host_id || "");
  if (!row) return;
  if (ENDED.has(row.dataset.status || "") && !ENDED.has(host.status)) return; // an older read
  row.dataset.status = host.status;
  const word = host.status.charAt(0).toUpperCase() + host.status.slice(1);
  /** @type {Element} */ (row.querySelector('[data-cell="status"]')).replaceChildren(
    el("span", { className: `badge status-${host.status}` }, word),
  );
  /** @type {Element} */ (row.querySelector('[data-cell="exit-code"]')).textContent =
    host.exit_code === null || host.exit_code === undefined ? "—" : String(host.exit_code);
  /** @type {Element} */ (row.querySelector('[data-cell="reason"]')).textContent = host.reason || "";
}

/** The hosts whose rows show how they ended. */
function endedInRows() {
  return [...rows.values()].filter((row) => ENDED.has(row.dataset.status || "")).length;
}

/**
 * The hosts of ``run`` that ended, by its counts.
 * @param {JsonObject} run
 */
function endedIn(run) {
  const counts = /** @type {Record<string, number>} */ (run.counts || {});
  return [...ENDED].reduce((sum, key) => sum + (counts[key] || 0), 0);
}

/** Read the whole run again (after lost events, or ends the page never heard of). */
async function reload() {
  try {
    const run = await getJSON(`/api/fleet-runs/${runId}/`);
    showRun(run);
    for (const host of run.hosts || []) showHost(host);
  } catch (err) {
    showNotice(`Could not read the run again: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "run-reload" });
  }
}
