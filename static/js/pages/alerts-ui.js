// @ts-check
/**
 * Alert tables shared by the alerts page and the host page: rows like the server's
 * `alerts/_alert_row.html`, live updates from `system_alerts`, and the acknowledge and
 * resolve buttons, which send a `command` on `system_alerts`.
 */
import { describeError, el, showNotice, timeElement } from "./live.js";

/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */
/** @typedef {import("../sysmanage-client.js").SysManageClient} SysManageClient */
/** @typedef {import("../sysmanage-client.js").SysManageError} SysManageError */

/** @type {Record<string, string>} */
const SEVERITY_WORDS = { info: "Info", warning: "Warning", critical: "Critical" };
/** @type {Record<string, string>} */
const STATE_WORDS = { open: "Open", acknowledged: "Acknowledged", resolved: "Resolved" };
/** @type {Record<string, string>} */
const DONE_WORDS = { acknowledge: "acknowledged", resolve: "resolved" };

/**
 * An alert from `GET /api/alerts/`, in the shape of a `system_alerts` event.
 * @param {JsonObject} alert
 * @returns {JsonObject}
 */
export function alertFromApi(alert) {
  return {
    alert_id: alert.id, severity: alert.severity, status: alert.status, title: alert.title,
    message: alert.message, host_id: alert.host, hostname: alert.hostname,
    created_at: alert.created_at,
  };
}

/**
 * Keeps the rows of one alert table: finds, adds, updates and removes them.
 */
export class AlertTable {
  /**
   * @param {{tbody: HTMLElement, empty: HTMLElement, showHost: boolean, canManage: boolean,
   *          states: string[], onCountChange?: (delta: number) => void}} options
   *   `states`: the alert states the table shows (empty: all).
   */
  constructor({ tbody, empty, showHost, canManage, states, onCountChange }) {
    this.tbody = tbody;
    this.empty = empty;
    this.showHost = showHost;
    this.canManage = canManage;
    this.states = states;
    this.onCountChange = onCountChange;
  }

  /**
   * Whether an alert in `status` belongs in this table.
   * @param {string} status
   */
  shows(status) {
    return this.states.length === 0 || this.states.includes(status);
  }

  /**
   * The row of an alert, if the table has it.
   * @param {string} alertId
   * @returns {HTMLTableRowElement|null}
   */
  row(alertId) {
    return this.tbody.querySelector(`tr[data-alert-id="${CSS.escape(alertId)}"]`);
  }

  /**
   * Replace every row (e.g. after reading the list from the REST API).
   * @param {JsonObject[]} alerts
   */
  replaceAll(alerts) {
    this.tbody.replaceChildren(...alerts.filter((a) => this.shows(a.status)).map((a) => this.build(a)));
    this.updateEmpty();
  }

  /**
   * Apply a `system_alerts` event (or a command's answer): update the row, add a newly
   * raised alert at the top (when `prependNew`), or let a row go when it leaves the filter.
   * Older alerts the table does not show stay out: the table is ordered by age.
   * @param {JsonObject} alert
   * @param {{prependNew?: boolean}} [options]
   */
  apply(alert, { prependNew = true } = {}) {
    const row = this.row(alert.alert_id);
    if (row) {
      this.update(row, alert);
      if (!this.shows(alert.status)) this.leave(row);
    } else if (prependNew && alert.action === "raised" && this.shows(alert.status)) {
      const fresh = this.build({ created_at: alert.timestamp, ...alert });
      fresh.classList.add("is-new");
      this.tbody.prepend(fresh);
      this.onCountChange?.(1);
    }
    this.updateEmpty();
  }

  /**
   * Apply a `system_alerts` snapshot (the unresolved alerts, sent on every subscription):
   * the rows shown take their alerts' current state. No row is added: the snapshot does
   * not say when each alert was raised, and the table is ordered by that.
   * @param {JsonObject} snapshot the `data` of the `status` message
   */
  applySnapshot(snapshot) {
    for (const alert of snapshot.alerts) this.apply(alert, { prependNew: false });
  }

  /**
   * Fade a row that no longer matches the filter, then remove it.
   * @param {HTMLTableRowElement} row
   */
  leave(row) {
    if (row.classList.contains("is-leaving")) return;
    row.classList.add("is-leaving");
    setTimeout(() => {
      row.remove();
      this.onCountChange?.(-1);
      this.updateEmpty();
    }, 4000);
  }

  updateEmpty() {
    this.empty.hidden = this.tbody.querySelector("tr:not(.is-leaving)") !== null;
  }

  /**
   * A new row, the same cells as `alerts/_alert_row.html`.
   * @param {JsonObject} alert
   */
  build(alert) {
    const row = el("tr", { dataset: { alertId: alert.alert_id } },
      el("td", { dataset: { cell: "severity" } }),
      el("td", { className: "cell-wide", dataset: { cell: "title" } }),
      this.showHost ? el("td", { dataset: { cell: "host" } },
        alert.host_id ? el("a", { href: `/hosts/${alert.host_id}/` }, alert.hostname || "host") : "—") : null,
      el("td", { dataset: { cell: "status" } }),
      el("td", { className: "col-optional nowrap", dataset: { cell: "raised" } }, timeElement(alert.created_at, "—")),
      this.canManage ? el("td", { className: "actions", dataset: { cell: "actions" } },
        el("button", { type: "button", className: "button button-small", dataset: { action: "acknowledge" } }, "Acknowledge"),
        el("button", { type: "button", className: "button button-small", dataset: { action: "resolve" } }, "Resolve")) : null,
    );
    this.update(row, alert);
    return row;
  }

  /**
   * Show an alert's current severity, text and state in its row.
   * @param {HTMLTableRowElement} row
   * @param {JsonObject} alert
   */
  update(row, alert) {
    if (alert.severity) {
      row.dataset.severity = alert.severity;
      /** @type {Element} */ (row.querySelector('[data-cell="severity"]')).replaceChildren(
        el("span", { className: `badge severity-${alert.severity}` }, SEVERITY_WORDS[alert.severity] || alert.severity));
    }
    if (alert.title) {
      const cell = /** @type {Element} */ (row.querySelector('[data-cell="title"]'));
      cell.replaceChildren(el("span", { className: "alert-title" }, alert.title));
      if (alert.message) cell.append(el("span", { className: "sub" }, alert.message));
    }
    if (alert.status && alert.status !== row.dataset.status) {
      row.dataset.status = alert.status;
      /** @type {Element} */ (row.querySelector('[data-cell="status"]')).replaceChildren(
        el("span", { className: `badge state-${alert.status}` }, STATE_WORDS[alert.status] || alert.status));
      row.classList.remove("is-changed");
      void row.offsetWidth; // restart the highlight
      row.classList.add("is-changed");
    }
    this.updateButtons(row);
  }

  /**
   * Acknowledge only open alerts; resolve open and acknowledged ones.
   * @param {HTMLTableRowElement} row
   */
  updateButtons(row) {
    const title = row.querySelector(".alert-title")?.textContent ?? "";
    for (const button of /** @type {NodeListOf<HTMLButtonElement>} */ (row.querySelectorAll("button[data-action]"))) {
      const action = button.dataset.action;
      button.hidden = action === "acknowledge" ? row.dataset.status !== "open" : row.dataset.status === "resolved";
      button.setAttribute("aria-label", `${action === "acknowledge" ? "Acknowledge" : "Resolve"}: ${title}`);
    }
  }

  /**
   * Run the acknowledge and resolve buttons through the socket.
   * @param {SysManageClient} client
   */
  bindActions(client) {
    this.tbody.addEventListener("click", (event) => {
      const button = /** @type {HTMLButtonElement|null} */ (/** @type {Element} */ (event.target).closest("button[data-action]"));
      if (button && this.tbody.contains(button)) this.act(client, button);
    });
  }

  /**
   * @param {SysManageClient} client
   * @param {HTMLButtonElement} button
   */
  async act(client, button) {
    const row = /** @type {HTMLTableRowElement} */ (button.closest("tr"));
    const { action } = /** @type {{action: string}} */ (button.dataset);
    const title = row.querySelector(".alert-title")?.textContent ?? "The alert";
    const buttons = /** @type {NodeListOf<HTMLButtonElement>} */ (row.querySelectorAll("button[data-action]"));
    buttons.forEach((b) => { b.disabled = true; });
    const label = button.textContent;
    button.textContent = action === "acknowledge" ? "Acknowledging…" : "Resolving…";
    try {
      const answer = await client.command("system_alerts", { action, alert_id: row.dataset.alertId });
      this.apply({ alert_id: answer.alert_id, status: answer.status, severity: answer.severity });
      showNotice(`“${title}” ${DONE_WORDS[action]}.`, { kind: "ok" });
    } catch (err) {
      showNotice(`Could not ${action} “${title}”: ${describeError(/** @type {SysManageError} */ (err))}`, { kind: "error" });
    } finally {
      button.textContent = label;
      buttons.forEach((b) => { b.disabled = false; });
      if (row.isConnected && !row.contains(document.activeElement)) {
        // The pressed button may be hidden now: keep the keyboard focus in the row.
        /** @type {HTMLElement|null} */ (row.querySelector("button[data-action]:not([hidden])") || row.querySelector("a"))?.focus();
      }
    }
  }
}
