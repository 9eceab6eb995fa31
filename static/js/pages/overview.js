// @ts-check
/**
 * `/`: fleet figures from `fleet_status`, active alerts by severity (recounted through
 * the REST API whenever `system_alerts` reports a change) and, for staff, recent activity.
 */
import { followActivity } from "./activity-feed.js";
import { getJSON, onRebuild, pageData, showNotice, startLive } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

const SEVERITIES = ["critical", "warning", "info"];
const FIGURES = [
  "total_hosts", "online_hosts", "offline_hosts", "hosts_with_alerts", "pending_operations",
  "hosts_with_security_updates", "hosts_needing_reboot",
];

const data = pageData();
const client = startLive();

client.subscribe("fleet_status", null, showFleet);
// Every alert change, replayed or live, leads to a recount, as does a rebuild after lost
// events; the snapshot sent on subscribing says nothing the counts read at load do not.
client.subscribe("system_alerts", null, (_, message) => { if (message.type === "event") scheduleRecount(); });
onRebuild(client, "system_alerts", () => scheduleRecount());
if (data.canViewActivity) {
  onRebuild(client, "user_activity", () => showNotice("Reconnected. Activity recorded while this page was offline is not listed.",
    { kind: "warn", key: "reconnected", action: { text: "Reload", run: () => location.reload() } }));
  followActivity(client, {
    tbody: /** @type {HTMLTableSectionElement} */ (document.getElementById("activity-rows")),
    empty: /** @type {HTMLElement} */ (document.getElementById("activity-empty")),
    compact: true,
    data,
  });
}

/**
 * Put the `fleet_status` figures (snapshot or event) on the page.
 * @param {JsonObject} fleet
 */
function showFleet(fleet) {
  for (const name of FIGURES) {
    const node = document.querySelector(`[data-figure="${name}"]`);
    if (!node || typeof fleet[name] !== "number") continue;
    node.textContent = String(fleet[name]);
    const card = /** @type {HTMLElement} */ (node.closest(".figure"));
    if (card.dataset.nonzero !== undefined) card.dataset.nonzero = String(fleet[name] > 0);
  }
  const updated = /** @type {HTMLTimeElement} */ (document.getElementById("fleet-updated"));
  if (fleet.last_updated) updated.dateTime = fleet.last_updated;
  /** @type {HTMLElement} */ (document.getElementById("empty-fleet")).hidden = fleet.total_hosts > 0;
}

/** @type {ReturnType<typeof setTimeout>|undefined} */
let recountTimer = undefined;

/** Alerts change in bursts (a rule raising several); count once the burst is over. */
function scheduleRecount() {
  clearTimeout(recountTimer);
  recountTimer = setTimeout(recountAlerts, 400);
}

/** Count active alerts per severity with `GET /api/alerts/` (one request each, `limit=1`). */
async function recountAlerts() {
  let counts;
  try {
    counts = await Promise.all(SEVERITIES.map(async (severity) => {
      const page = await getJSON(`/api/alerts/?status=open,acknowledged&severity=${severity}&limit=1`);
      return [severity, page.count];
    }));
  } catch (err) {
    showNotice(`Could not count the alerts: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "alert-count" });
    return;
  }
  let total = 0;
  for (const [severity, count] of counts) {
    total += count;
    const number = /** @type {HTMLElement} */ (document.querySelector(`[data-severity="${severity}"]`));
    number.textContent = String(count);
    /** @type {HTMLElement} */ (number.closest(".severity-count")).dataset.nonzero = String(count > 0);
  }
  /** @type {HTMLElement} */ (document.getElementById("alerts-none")).hidden = total > 0;
}
