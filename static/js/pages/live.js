// @ts-check
/**
 * What every dashboard page shares: the live connection (session-authenticated
 * {@link SysManageClient}), the connection indicator, rebuilding a channel's state when its
 * events were lost during a disconnect, notices for server errors, relative times that
 * tick, and small helpers for building DOM nodes and reading the REST API.
 */
import { SysManageClient } from "../sysmanage-client.js";

/** @typedef {import("../sysmanage-client.js").ErrorReport} ErrorReport */
/** @typedef {import("../sysmanage-client.js").ResumeReport} ResumeReport */
/** @typedef {import("../sysmanage-client.js").JsonObject} JsonObject */

/**
 * The JSON the page rendered with `json_script` under the id `page-data`.
 * @returns {Record<string, any>}
 */
export function pageData() {
  const node = document.getElementById("page-data");
  return node ? JSON.parse(/** @type {string} */ (node.textContent)) : {};
}

/**
 * Start the page's connection to `/ws` with the session cookie (no token), wired to the
 * connection indicator and to the notices. After a reconnect the client resumes each
 * subscription: missed events reach the handlers like live ones, or the page is told to
 * rebuild ({@link onRebuild}, {@link StreamRebuild}).
 * @returns {SysManageClient}
 */
export function startLive() {
  const client = new SysManageClient({ getToken: async () => null });
  const indicator = document.getElementById("connection");
  if (indicator) watchConnection(client, indicator);
  client.onError(reportClientError);
  startRelativeTimes();
  return client.connect();
}

// -- rebuilding after lost events -------------------------------------------------------

/** How long a page waits for a `status` snapshot the server announced, before reading the REST API instead. */
const SNAPSHOT_WAIT_MS = 5000;

/**
 * Call `fn(report)` when the events of `channel` published during a disconnect were lost
 * (the server could not replay them): the page must rebuild what it shows of the channel.
 * @param {SysManageClient} client
 * @param {string} channel
 * @param {(report: ResumeReport) => void} fn
 * @returns {() => void} stops listening
 */
export function onRebuild(client, channel, fn) {
  return client.onResume((report) => {
    if (report.channel === channel && report.status === "rebuild") fn(report);
  });
}

/**
 * Keeps what a page shows of one channel whole across disconnects. Replayed events need
 * nothing: they reach the subscription's handler like live ones. When the events were
 * lost, the state is rebuilt from the `status` snapshot that follows (`fromSnapshot`, which
 * returns false when the snapshot lacks what it needs), or from the REST API (`fromRest`)
 * when no snapshot is announced, the snapshot is unusable, or it does not come within
 * {@link SNAPSHOT_WAIT_MS}. The subscription's handler passes snapshots to {@link snapshot}
 * and events through {@link apply}, which applies an event again once a REST answer that
 * was on its way is in (so that the older answer does not undo it).
 */
export class StreamRebuild {
  /**
   * @param {SysManageClient} client
   * @param {string} channel
   * @param {{fromSnapshot?: (data: JsonObject, report: ResumeReport|null) => boolean,
   *          fromRest: (report: ResumeReport|null) => Promise<void>|void}} how
   */
  constructor(client, channel, { fromSnapshot, fromRest }) {
    this.fromSnapshot = fromSnapshot;
    this.fromRest = fromRest;
    /** @type {ResumeReport|null} the rebuild under way */
    this.report = null;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this.timer = undefined;
    /** @type {(() => void)[]|null} events to apply again after the REST answer */
    this.replay = null;
    onRebuild(client, channel, (report) => {
      this.report = report;
      clearTimeout(this.timer);
      this.timer = undefined;
      if (report.snapshot && this.fromSnapshot) this.timer = setTimeout(() => this.read(), SNAPSHOT_WAIT_MS);
      else this.read();
    });
  }

  /**
   * A `status` snapshot of the channel arrived.
   * @param {JsonObject} data
   */
  snapshot(data) {
    const awaited = this.timer !== undefined;
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.fromSnapshot?.(data, this.report)) return;
    if (awaited) this.read();
  }

  /**
   * Apply an event now, and again after the REST answer if one is on its way.
   * @param {() => void} fn
   */
  apply(fn) {
    fn();
    this.replay?.push(fn);
  }

  /** Rebuild from the REST API. */
  async read() {
    /** @type {(() => void)[]} */
    const replay = [];
    this.replay = replay;
    try {
      await this.fromRest(this.report);
    } catch (err) {
      showNotice(`Could not bring this page up to date: ${/** @type {Error} */ (err).message}`, { kind: "error", key: "rebuild" });
    } finally {
      if (this.replay === replay) this.replay = null;
      replay.forEach((fn) => fn());
    }
  }
}

// -- the connection indicator -----------------------------------------------------------

const STATE_WORDS = {
  connecting: "Connecting…",
  open: "Live",
  offline: "Offline",
  unauthenticated: "Signed out",
  closed: "Disconnected",
};

/**
 * Show the client's state in the header: words, a countdown, "Retry now", "Log in".
 * @param {SysManageClient} client
 * @param {HTMLElement} indicator
 */
function watchConnection(client, indicator) {
  const label = /** @type {HTMLElement} */ (indicator.querySelector(".connection-label"));
  const countdown = /** @type {HTMLElement} */ (indicator.querySelector(".connection-countdown"));
  const retry = /** @type {HTMLButtonElement} */ (indicator.querySelector(".connection-retry"));
  const login = /** @type {HTMLAnchorElement} */ (indicator.querySelector(".connection-login"));
  /** @type {ReturnType<typeof setInterval>|undefined} */
  let timer = undefined;
  retry.addEventListener("click", () => client.reconnectNow());
  client.onStateChange((state, info) => {
    clearInterval(timer);
    indicator.dataset.state = state;
    const words = state === "offline" ? "Offline — retrying" : STATE_WORDS[state] ?? state;
    if (label.textContent !== words) label.textContent = words; // re-announced otherwise
    countdown.textContent = "";
    retry.hidden = state !== "offline";
    login.hidden = state !== "unauthenticated";
    if (state === "offline") {
      const show = () => {
        const seconds = Math.max(0, Math.ceil((/** @type {number} */ (info.retryAt) - Date.now()) / 1000));
        countdown.textContent = `in ${seconds} s`;
      };
      show();
      timer = setInterval(show, 1000);
    }
    if (state === "unauthenticated") {
      const why = lastAuthFailure ? ` (${lastAuthFailure})` : "";
      showNotice(`You are signed out${why}, so this page no longer updates. Log in again to continue.`,
        { kind: "error", key: "signed-out", link: { href: login.href, text: "Log in" } });
    } else if (state === "open") {
      lastAuthFailure = "";
      dismissNotice("signed-out");
    }
  });
}

// -- notices ------------------------------------------------------------------------------

/**
 * Words for the errors a page may see, by code; the server's own message otherwise.
 * @type {Record<string, (message: string) => string>}
 */
const ERROR_WORDS = {
  PERMISSION_DENIED: (m) => `Not allowed: ${m}`,
  TIMEOUT: () => "No answer from the server in time. The request may still take effect.",
  DISCONNECTED: () => "The connection dropped before the answer arrived. The request may still have taken effect.",
  CLOSED: () => "The page is not connected.",
  UNAUTHENTICATED: () => "You are signed out. Log in again.",
  QUEUE_FULL: () => "Too many requests are waiting for the connection; the oldest was dropped.",
  MESSAGE_TOO_LARGE: () => "That request is too large to send.",
  RATE_LIMITED: () => "Too many requests at once; wait a moment and try again.",
  SLOW_CONSUMER: () => "The server dropped this page's connection because it fell behind; reconnecting.",
  SERVICE_UNAVAILABLE: () => "The server cannot deliver live updates right now; retrying.",
  INTERNAL_ERROR: () => "The server hit an unexpected error.",
  TOKEN_UNAVAILABLE: (m) => m,
  CONNECT_FAILED: (m) => `Cannot open the live connection: ${m}`,
  MALFORMED_MESSAGE: () => "Ignored a message from the server that could not be read.",
};

/**
 * A sentence for a failed request or a client error.
 * @param {{code?: string, message?: string}} error a SysManageError or an onError report
 */
export function describeError(error) {
  const code = error?.code;
  const message = error?.message || "Something went wrong.";
  const words = ERROR_WORDS[/** @type {string} */ (code)];
  return words ? words(message) : message;
}

/** Why the server last refused this page's credentials ("Logged out", "User account is disabled"). */
let lastAuthFailure = "";

/**
 * Errors not tied to a request: show them, except the ones the indicator already says.
 * @param {ErrorReport} error
 */
function reportClientError(error) {
  if (error.code === "AUTH_FAILED") {
    // Said with the "signed out" notice if the client gives up; the client retries once
    // first, and "Missing JWT token" is only how the server says the session is gone.
    if (!/token/i.test(error.message)) lastAuthFailure = error.message;
    return;
  }
  const where = error.channel && error.code === "SUBSCRIPTION_FAILED" ? ` (${error.channel})` : "";
  showNotice(`Server error${where}: ${describeError(error)}`, { kind: "error", key: error.code });
}

/**
 * Show a notice at the top of the page. Errors stay until dismissed; others fade after
 * a few seconds. A `key` replaces an earlier notice with the same key.
 * @param {string} text
 * @param {{kind?: "error"|"warn"|"ok"|"info", key?: string, link?: {href: string, text: string},
 *          action?: {text: string, run: () => void}}} [options]
 */
export function showNotice(text, { kind = "info", key, link, action } = {}) {
  const area = document.getElementById("notices");
  if (!area) return;
  if (key) dismissNotice(key);
  const notice = el("div", { className: `notice notice-${kind}`, role: kind === "error" ? "alert" : "status" });
  if (key) notice.dataset.key = key;
  const body = el("p", { className: "notice-text" }, text);
  if (link) body.append(" ", el("a", { href: link.href }, link.text));
  notice.append(body);
  if (action) {
    notice.append(el("button", { type: "button", className: "link-button", onclick: () => { notice.remove(); action.run(); } }, action.text));
  }
  notice.append(el("button", { type: "button", className: "link-button", onclick: () => notice.remove() }, "Dismiss"));
  area.prepend(notice);
  while (area.children.length > 4) /** @type {Element} */ (area.lastElementChild).remove();
  if (kind !== "error" && !action) setTimeout(() => notice.remove(), 6000);
}

/**
 * Remove the notice shown with `key`, if any.
 * @param {string} key
 */
export function dismissNotice(key) {
  document.querySelectorAll(`#notices [data-key="${CSS.escape(key)}"]`).forEach((n) => n.remove());
}

// -- relative times --------------------------------------------------------------------------

/**
 * "just now", "42 s ago", "5 min ago", "3 h ago", "2 days ago".
 * @param {number} then epoch ms
 * @param {number} [now] epoch ms
 */
export function relativeTime(then, now = Date.now()) {
  const seconds = Math.round((now - then) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  const days = Math.floor(seconds / 86400);
  return `${days} day${days === 1 ? "" : "s"} ago`;
}

/**
 * The full local date and time, for tooltips.
 * @param {string|number} date an ISO time or epoch ms
 */
export function absoluteTime(date) {
  return new Date(date).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

/**
 * A `<time data-relative>` for an ISO time, kept current by the page's ticker.
 * @param {string|null|undefined} iso
 * @param {string} [never] text when there is no time
 */
export function timeElement(iso, never = "Never") {
  if (!iso) return document.createTextNode(never);
  const node = el("time", { dateTime: iso, title: absoluteTime(iso) });
  node.dataset.relative = "";
  node.textContent = relativeTime(Date.parse(iso));
  return node;
}

let ticking = false;

/** Update every `<time data-relative>` now and every second. */
function startRelativeTimes() {
  if (ticking) return;
  ticking = true;
  const tick = () => {
    const now = Date.now();
    for (const node of /** @type {NodeListOf<HTMLTimeElement>} */ (document.querySelectorAll("time[data-relative]"))) {
      const then = Date.parse(node.dateTime);
      if (Number.isNaN(then)) continue;
      const text = relativeTime(then, now);
      if (node.textContent !== text) node.textContent = text;
      if (!node.title) node.title = absoluteTime(then);
    }
  };
  tick();
  setInterval(tick, 1000);
}

// -- DOM and REST helpers -----------------------------------------------------------------------

/**
 * Create an element: `el("a", {href: "/x", className: "y"}, "text", child)`.
 * Properties are assigned (so `onclick`, `hidden`, `dataset` work); text is never parsed as HTML.
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Record<string, any>} [props]
 * @param {...(Node|string|null|undefined|false)} children
 * @returns {HTMLElementTagNameMap[K]}
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "role" || key.startsWith("aria")) node.setAttribute(key.replace(/^aria([A-Z])/, (_, c) => `aria-${c.toLowerCase()}`), value);
    else /** @type {Record<string, any>} */ (node)[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/**
 * GET a REST API URL with the session; resolves with the parsed JSON.
 * Rejects with an Error whose message is meant for people.
 * @param {string} url
 * @returns {Promise<any>}
 */
export async function getJSON(url) {
  let answer;
  try {
    answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  } catch {
    throw new Error("The server could not be reached.");
  }
  if (answer.status === 401 || answer.status === 403) throw new Error("You are signed out, or not allowed to read this.");
  if (!answer.ok) throw new Error(`The server answered ${answer.status} ${answer.statusText}.`);
  return answer.json();
}

/**
 * Format a number with at most `digits` decimals, or "—".
 * @param {number|string|null|undefined} value
 */
export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}
