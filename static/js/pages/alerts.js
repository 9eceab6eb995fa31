// @ts-check
/**
 * `/alerts/`: the server-rendered alerts table, kept current from `system_alerts`
 * (new alerts appear on the first page, state changes update their rows), with
 * acknowledge and resolve buttons for those allowed to use them.
 */
import { AlertTable } from "./alerts-ui.js";
import { pageData, showNotice, startLive } from "./live.js";

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

const client = startLive({
  onReconnect: () => showNotice("Reconnected. Alert changes made while this page was offline are not shown.",
    { kind: "warn", key: "reconnected", action: { text: "Reload", run: () => location.reload() } }),
});
if (data.canManageAlerts) table.bindActions(client);

// Severity is filtered by the server; states here, since an alert's state changes.
const filters = data.severities.length ? { severity: data.severities } : null;
client.subscribe("system_alerts", filters, (alert, message) => {
  if (message.type === "status") table.applySnapshot(alert);
  else table.apply(alert, { prependNew: data.firstPage });
});
