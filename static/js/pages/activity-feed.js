// @ts-check
/**
 * The live user activity table (overview and activity page): rows rendered by the server,
 * then `user_activity` events prepended, newest first, up to a limit.
 */
import { el, timeElement } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

/**
 * `details` as one line, `key: value · key: value`, without identifiers; the same as
 * the server's `details_text`.
 * @param {JsonObject|null|undefined} details
 * @param {string[]} hidden the keys to leave out
 */
export function detailsText(details, hidden) {
  return Object.entries(details || {})
    .filter(([key, value]) => !hidden.includes(key) && value !== null && value !== "")
    .map(([key, value]) => `${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(" · ");
}

/**
 * Follow `user_activity` into a table body.
 * @param {import("../sysmanage-client.js").SysManageClient} client
 * @param {{tbody: HTMLTableSectionElement, empty: HTMLElement, compact: boolean, data: JsonObject}} options
 *   `data` is the page data: `activityRows`, `actionLabels`, `warningActions`, `hiddenDetails`
 */
export function followActivity(client, { tbody, empty, compact, data }) {
  const unsubscribe = client.subscribe("user_activity", null, (activity) => {
    const row = activityRow(activity, compact, data);
    row.classList.add("is-new");
    tbody.prepend(row);
    while (tbody.rows.length > data.activityRows) /** @type {Element} */ (tbody.lastElementChild).remove();
    empty.hidden = true;
  });
  return unsubscribe;
}

/**
 * One row, the same cells as the server's `activity/_activity_row.html`.
 * @param {JsonObject} activity a `user_activity` event
 * @param {boolean} compact
 * @param {JsonObject} data the page data
 */
function activityRow(activity, compact, data) {
  const warning = data.warningActions.includes(activity.action);
  const label = data.actionLabels[activity.action] || activity.action;
  const details = detailsText(activity.details, data.hiddenDetails);
  return el("tr", { className: warning ? "is-warning" : "" },
    el("td", { className: "nowrap" }, timeElement(activity.timestamp)),
    el("td", {}, activity.username),
    el("td", {}, el("span", { className: warning ? "action action-warning" : "action" }, label)),
    compact ? null : el("td", { className: "col-optional nowrap" }, activity.ip_address || "—"),
    el("td", { className: "details cell-wide", title: activity.user_agent || undefined }, details || "—"),
  );
}
