// @ts-check
/**
 * `/fleet-runs/`: start a command on a host group and/or the hosts a search matches (a
 * fleet run: `command` on `command_execution` with `targets`), then open the run's page,
 * which follows it live.
 * The list of the latest runs is the server's, as the page was loaded.
 */
import { describeError, startLive } from "./live.js";

/** @typedef {import("../sysmanage-client.js").SysManageError} SysManageError */

const form = /** @type {HTMLFormElement} */ (document.getElementById("fleet-run-form"));
const errorText = /** @type {HTMLElement} */ (document.getElementById("run-error"));
const client = startLive();

/**
 * The value of a form field.
 * @param {string} name
 */
function field(name) {
  return /** @type {HTMLInputElement} */ (form.elements.namedItem(name)).value.trim();
}

/**
 * `failure_limit` as the server takes it: a number of hosts, or a percent string.
 * @param {string} text
 * @returns {number|string|undefined}
 */
function failureLimit(text) {
  if (!text) return undefined;
  return text.endsWith("%") ? text : Number(text);
}

/**
 * `targets` of the run: the group chosen and the hosts the search matches.
 * @param {string} group
 * @param {string} search
 */
function targets(group, search) {
  return {
    ...(group ? { groups: [group] } : {}),
    ...(search ? { filter: { search } } : {}),
  };
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!form.reportValidity()) return;
  errorText.hidden = true;
  const button = /** @type {HTMLButtonElement} */ (form.querySelector("button[type=submit]"));
  button.disabled = true;
  try {
    const run = await client.command("command_execution", {
      targets: targets(field("group"), field("search")),
      command: field("command"),
      batch_size: Number(field("batch_size")),
      timeout: Number(field("timeout")),
      failure_limit: failureLimit(field("failure_limit")),
      offline: field("offline"),
    });
    location.assign(`/fleet-runs/${run.run_id}/`);
  } catch (err) {
    errorText.textContent = describeError(/** @type {SysManageError} */ (err));
    errorText.hidden = false;
    button.disabled = false;
  }
});
