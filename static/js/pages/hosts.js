// @ts-check
/**
 * `/hosts/`: the hosts table with live status and last-seen from `host_status`
 * (snapshot, then events with `previous_status`) and instant filtering as you type; for
 * those who may watch every host's metrics, live CPU and memory from one `host_metrics`
 * subscription to every host (`host_id: "*"`: a snapshot, then a summary a second).
 *
 * The server renders the hosts matching `?q=` (in the group `?group=` names); once a
 * snapshot names hosts the table does not have (a narrower server search, or hosts
 * enrolled since), the whole list (of the group) is read from `GET /api/hosts/` so that
 * filtering can widen again without a reload.  Groups are as the page was loaded, apart
 * from the rows added later; choosing another group loads the page again.
 */
import { el, getJSON, pageData, showNotice, startLive, timeElement } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

/** @type {Record<string, string>} */
const STATUS_WORDS = { online: "Online", offline: "Offline", unknown: "Unknown" };

const tbody = /** @type {HTMLTableSectionElement} */ (document.getElementById("host-rows"));
const search = /** @type {HTMLInputElement} */ (document.getElementById("host-search"));
const groupSelect = /** @type {HTMLSelectElement|null} */ (document.getElementById("host-group"));
const countText = /** @type {HTMLElement} */ (document.getElementById("host-count"));
const changeText = /** @type {HTMLElement} */ (document.getElementById("host-change"));
const rows = new Map([...tbody.rows].map((row) => [row.dataset.hostId, row]));
/** Hosts known to be outside the group the page shows (their events are ignored). */
const outside = new Set();
let listComplete = false;
/** @type {Promise<void>|null} */
let loading = null;

const liveMetrics = pageData().liveMetrics === true;
/** The group the page shows (`?group=`), or null for every host. */
const group = typeof pageData().group === "string" ? /** @type {string} */ (pageData().group) : null;
const client = startLive();
client.subscribe("host_status", null, (data, message) => {
  if (message.type === "status") applySnapshot(data.hosts);
  else applyChange(data);
});
if (liveMetrics) client.subscribe("host_metrics", { host_id: "*", metrics: ["cpu", "memory"] }, (data) => showMetrics(data.hosts));

/**
 * Every host's latest CPU and memory (the snapshot, or a summary of those that reported).
 * @param {JsonObject[]} hosts
 */
function showMetrics(hosts) {
  for (const host of hosts || []) {
    const row = rows.get(host.host_id);
    if (!row) continue;
    setPercent(row, "cpu", host.metrics.cpu_usage);
    setPercent(row, "memory", host.metrics.memory_usage);
  }
}

/**
 * @param {HTMLTableRowElement} row
 * @param {string} cell
 * @param {unknown} value a percentage, if reported
 */
function setPercent(row, cell, value) {
  const node = row.querySelector(`[data-cell="${cell}"]`);
  if (node && typeof value === "number") node.textContent = `${value.toFixed(1)} %`;
}

search.addEventListener("input", () => {
  const query = search.value.trim();
  const url = new URL(location.href);
  if (query) url.searchParams.set("q", query);
  else url.searchParams.delete("q");
  history.replaceState(null, "", url);
  applyFilter();
});
/** @type {HTMLFormElement} */ (search.form).addEventListener("submit", (event) => {
  if (groupSelect && groupSelect.value.toLowerCase() !== (group || "").toLowerCase()) return; // another group: the server's
  event.preventDefault(); // the table is filtered already; the URL says so too
  applyFilter();
});
groupSelect?.addEventListener("change", () => /** @type {HTMLFormElement} */ (search.form).requestSubmit());

/**
 * The status badge, like `hosts/_status_badge.html`.
 * @param {string} status
 */
function statusBadge(status) {
  return el("span", { className: `badge status-${status}` }, STATUS_WORDS[status] || status);
}

/**
 * "now" for an online host (its agent reports all the time), else the last time seen.
 * @param {string} status
 * @param {string|null|undefined} iso
 */
function lastSeen(status, iso) {
  if (status === "online") {
    return el("span", { className: "seen-now", title: "The agent is connected and reporting" }, "now");
  }
  return timeElement(iso, "never");
}

/**
 * Show a host's status and last-seen in its row.
 * @param {HTMLTableRowElement} row
 * @param {string} status
 * @param {string|null|undefined} iso
 */
function setStatus(row, status, iso) {
  row.dataset.status = status;
  if (iso) row.dataset.lastSeen = iso;
  /** @type {Element} */ (row.querySelector('[data-cell="status"]')).replaceChildren(statusBadge(status));
  /** @type {Element} */ (row.querySelector('[data-cell="last-seen"]')).replaceChildren(lastSeen(status, row.dataset.lastSeen));
}

/**
 * A `host_status` snapshot: every host's state; hosts missing from it were deleted.
 * @param {JsonObject[]} hosts
 */
function applySnapshot(hosts) {
  const seen = new Set();
  for (const host of hosts) {
    seen.add(host.host_id);
    const row = rows.get(host.host_id);
    if (row) setStatus(row, host.status, host.last_seen);
  }
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
  if (hosts.some((host) => !rows.has(host.host_id))) loadAllHosts(); // filters when done
  else applyFilter();
}

/**
 * One host changed status.
 * @param {JsonObject} change a `host_status` event
 */
async function applyChange(change) {
  let row = rows.get(change.host_id);
  if (!row && outside.has(change.host_id)) return;
  if (!row) {
    // A host enrolled after this page was loaded: fetch its row, then show the change.
    try {
      upsertHost(await getJSON(`/api/hosts/${encodeURIComponent(change.host_id)}/`));
      applyFilter();
    } catch (err) {
      showNotice(`Could not load host ${change.hostname}: ${/** @type {Error} */ (err).message}`,
        { kind: "error", key: "hosts" });
      return;
    }
    row = rows.get(change.host_id);
    if (!row) return;
  }
  setStatus(row, change.status, change.status === "online" ? change.timestamp : null);
  row.classList.remove("is-changed");
  void row.offsetWidth; // restart the highlight
  row.classList.add("is-changed");
  const was = change.previous_status ? ` (was ${change.previous_status})` : "";
  changeText.replaceChildren(`Latest change: ${change.hostname} is ${change.status}${was}, `,
    timeElement(change.timestamp), ".");
}

/**
 * Read every host from the REST API (all pages) and add the rows the table lacks.
 * @returns {Promise<void>|null}
 */
function loadAllHosts() {
  if (listComplete || loading) return loading;
  loading = (async () => {
    try {
      let url = "/api/hosts/?limit=500" + (group ? `&group=${encodeURIComponent(group)}` : "");
      while (url) {
        const page = await getJSON(url);
        page.results.forEach(upsertHost);
        url = page.next;
      }
      listComplete = true;
    } catch (err) {
      showNotice(`Could not load the host list: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "hosts" });
    } finally {
      loading = null;
      applyFilter();
    }
  })();
  return loading;
}

/**
 * Add (in hostname order) or refresh the row of a host from the REST API.
 * @param {JsonObject} host
 */
function upsertHost(host) {
  if (group && !(host.groups || []).some((/** @type {JsonObject} */ g) => g.name.toLowerCase() === group.toLowerCase())) {
    outside.add(host.id);
    return;
  }
  let row = rows.get(host.id);
  if (!row) {
    row = hostRow(host);
    rows.set(host.id, row);
    const next = [...tbody.rows].find((other) => /** @type {string} */ (other.dataset.hostname).localeCompare(host.hostname) > 0);
    tbody.insertBefore(row, next || null);
  }
  setStatus(row, host.status, host.last_seen);
}

/**
 * A row like the server's, from a REST API host.
 * @param {JsonObject} host
 */
function hostRow(host) {
  const os = [host.os_name, host.os_version].filter(Boolean).join(" ") || "—";
  const name = el("th", { scope: "row" }, el("a", { href: `/hosts/${host.id}/` }, host.hostname));
  if (host.fqdn && host.fqdn !== host.hostname) name.append(el("span", { className: "sub" }, host.fqdn));
  const metrics = liveMetrics
    ? [el("td", { className: "num", dataset: { cell: "cpu" } }, "—"), el("td", { className: "num", dataset: { cell: "memory" } }, "—")]
    : [];
  return el("tr", { dataset: { hostId: host.id, hostname: host.hostname, fqdn: host.fqdn || "" } },
    name,
    el("td", { dataset: { cell: "status" } }),
    el("td", { className: "nowrap", dataset: { cell: "last-seen" } }),
    el("td", { dataset: { cell: "groups" } }, ...groupLinks(host.groups || [])),
    ...metrics,
    el("td", { className: "col-optional" }, os),
    el("td", { className: "col-optional" }, host.agent_version || "—"));
}

/**
 * Links to the hosts of each group, like `hosts/_groups.html`.
 * @param {JsonObject[]} groups `{id, name}` of each
 * @returns {(Node|string)[]}
 */
function groupLinks(groups) {
  if (!groups.length) return [el("span", { className: "muted" }, "—")];
  return groups.flatMap((g, i) => [
    ...(i ? [" "] : []),
    el("a", { className: "badge badge-group", href: `/hosts/?group=${encodeURIComponent(g.name)}` }, g.name),
  ]);
}

/** Show the rows whose hostname or FQDN contains the query (as the server searches). */
function applyFilter() {
  const query = search.value.trim().toLowerCase();
  let shown = 0;
  for (const row of rows.values()) {
    const match = !query || /** @type {string} */ (row.dataset.hostname).toLowerCase().includes(query) ||
      /** @type {string} */ (row.dataset.fqdn).toLowerCase().includes(query);
    row.hidden = !match;
    if (match) shown += 1;
  }
  const total = rows.size;
  /** @type {HTMLElement} */ (document.getElementById("hosts-none")).hidden = total > 0 || group !== null;
  /** @type {HTMLElement} */ (document.getElementById("hosts-no-match")).hidden = total === 0 || shown > 0;
  /** @type {HTMLElement} */ (document.getElementById("no-match-query")).textContent = search.value.trim();
  /** @param {number} n */
  const plural = (n) => `${n} host${n === 1 ? "" : "s"}`;
  const where = group === null ? "" : ` in group “${group}”`;
  const text = query ? `${shown} of ${plural(total)}${where} match “${search.value.trim()}”.` : `${plural(total)}${where}.`;
  // The server's note on a group that does not exist stays.
  if (!countText.textContent?.startsWith(text)) countText.textContent = text;
}
