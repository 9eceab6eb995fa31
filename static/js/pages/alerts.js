// @ts-check
/**
 * `/alerts/`: the server-rendered alerts table, kept current from `system_alerts`
 * (new alerts appear on the first page, state changes update their rows), with
 * acknowledge and resolve buttons for those allowed to use them. Changes made while the
 * page was disconnected are replayed; when they were lost, the first page is read again
 * from the REST API.
 */
import { AlertTable, alertFromApi, alertFromEvent } from "./alerts-ui.js";
import { getJSON, pageData, showNotice, startLive, StreamRebuild } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

/** Alerts per page, as the server renders them. */
const PAGE_SIZE = 100;

const data = pageData();
const countText = /** @type {HTMLElement} */ (document.getElementById("alert-count"));
let count = data.count;

const table = new AlertTable({
  tbody: /** @type {HTMLTableSectionElement} */ (document.getElementById("alert-rows")),
  empty: /** @type {HTMLElement} */ (document.getElementById("alerts-empty")),
  showHost: true,
  canManage: data.canManageAlerts,
  states: data.states,
  onCountChange: (delta) => {
    count = Math.max(0, count + delta);
    countText.textContent = countText.textContent.replace(/^\d+ alerts?/, `${count} alert${count === 1 ? "" : "s"}`);
  },
});

const client = startLive();
if (data.canManageAlerts) table.bindActions(client);

/**
 * After lost events: read the first page again (its filters, newest first) and bring the
 * table in line. Other pages cannot tell what moved onto them: they offer a reload.
 */
async function reloadFirstPage() {
  if (!data.firstPage) {
    showNotice("Reconnected. Alert changes made while this page was offline may be missing here.",
      { kind: "warn", key: "reconnected", action: { text: "Reload", run: () => location.reload() } });
    return;
  }
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (data.states.length) query.set("status", data.states.join(","));
  if (data.severities.length) query.set("severity", data.severities.join(","));
  try {
    const page = await getJSON(`/api/alerts/?${query}`);
    table.sync(page.results.map(alertFromApi), { complete: true });
  } catch (err) {
    showNotice(`Could not bring the alerts up to date: ${/** @type {Error} */ (err).message}`,
      { kind: "error", key: "reconnected", action: { text: "Reload", run: () => location.reload() } });
  }
}

// The snapshot lists current alerts, not this page's states and page: it updates the rows
// it names, and the REST API gives the rest.
const rebuild = new StreamRebuild(client, "system_alerts", { fromRest: reloadFirstPage });

// Severity is filtered by the server; states here, since an alert's state changes.
const filters = data.severities.length ? { severity: data.severities } : null;
client.subscribe("system_alerts", filters, (alert, message) => {
  if (message.type === "status") {
    for (const item of Array.isArray(alert.alerts) ? alert.alerts : []) table.apply(alertFromEvent(item), { prependNew: false });
  } else {
    rebuild.apply(() => table.apply(alert, { prependNew: data.firstPage }));
  }
});
