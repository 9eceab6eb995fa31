// @ts-check
/**
 * Browser client for the SysManage live WebSocket API (`/ws`); no dependencies, no build
 * step. It matches replies to requests by `id`, renews subscriptions after reconnecting (and
 * resumes their streams where they stopped, when the server can replay them), queues requests
 * while offline, reconnects with exponential backoff, checks the connection with ping/pong and
 * hands the connection a new access token before the current one expires (in band, without
 * reconnecting). See docs/browser-client.md.
 */

/** Defaults of the {@link SysManageClient} options (times in milliseconds). */
export const DEFAULTS = Object.freeze({
  pingInterval: 25000, pongTimeout: 10000, connectTimeout: 15000, requestTimeout: 30000,
  commandGrace: 40000, minDelay: 1000, maxDelay: 30000, stableAfter: 10000,
  refreshBefore: 60000, queueLimit: 100, maxMessageBytes: 65536,
});

/** Close code the client uses when it gives up on a connection that does not answer. */
const CLOSE_NO_ANSWER = 4000;

/** Channels whose `status` snapshot follows a subscription the server could not resume. */
const SNAPSHOT_CHANNELS = new Set(["host_status", "fleet_status", "system_alerts", "command_execution", "package_operations"]);
/** Channels with a snapshot on every subscribe, from servers that do not resume streams. */
const LEGACY_SNAPSHOT_CHANNELS = new Set(["host_status", "fleet_status"]);

/**
 * A decoded JSON object from the server (its fields depend on the channel).
 * @typedef {Record<string, any>} JsonObject
 */
/**
 * A message from the server: `response`, `pong`, `error`, `event` or `status`. Events
 * carry their place in the channel's stream (`offset`, `epoch`) when the server resumes
 * streams.
 * @typedef {{type: string, channel: string, data: JsonObject, id?: string|number|null,
 *            timestamp?: string, offset?: unknown, epoch?: unknown}} Envelope
 */
/**
 * A place in a channel's stream: events after it have a greater `offset` in the same `epoch`.
 * @typedef {{epoch: string, offset: number}} StreamPosition
 */
/**
 * A message to the server (the client adds the `id`).
 * @typedef {{type: string, channel?: string, data?: object, filters?: object,
 *            since?: StreamPosition}} OutgoingMessage
 */
/** @typedef {"closed"|"connecting"|"open"|"offline"|"unauthenticated"} ClientState */
/**
 * The second argument of an `onStateChange` callback (`offline`: when the next try is, and
 * how the connection closed, if it did).
 * @typedef {{retryIn?: number, retryAt?: number, attempt?: number, code?: number,
 *            reason?: string}} StateInfo
 */
/**
 * What `onError` callbacks get.
 * @typedef {{code: string, message: string, channel: string|null, data: JsonObject}} ErrorReport
 */
/**
 * What `onResume` callbacks get after a subscription was renewed (after a reconnect, or after
 * the server said events may have been missed). `status` is `recovered` (the missed events
 * are replayed to the handler, nothing to do) or `rebuild` (they are lost: rebuild from the
 * `status` snapshot when `snapshot` is true, otherwise from the REST API; `from` and `to` are
 * the server times between which events may be missing).
 * @typedef {{channel: string, status: "recovered"|"rebuild", reason: "reconnected"|"events_missed",
 *            snapshot: boolean, from: string|null, to: string|null,
 *            position: StreamPosition|null}} ResumeReport
 */
/** @typedef {(data: JsonObject, message: Envelope) => void} EventHandler */
/**
 * Unsubscribes when called; `ready` settles with the subscription's first answer.
 * @typedef {(() => Promise<void>) & {ready: Promise<Envelope>}} Unsubscribe
 */
/**
 * The options of {@link SysManageClient}, all optional; times in ms.
 * @typedef {object} ClientOptions
 * @property {string} [url] default: `/ws` on the page's host
 * @property {() => Promise<string|null>} [getToken] an access token, or null to use the
 *   page's Django session; called before every (re)connect and before the token expires
 * @property {typeof WebSocket} [WebSocketImpl] default `globalThis.WebSocket`
 * @property {(fn: () => void, ms: number) => unknown} [setTimeout] with `clearTimeout`,
 *   `now`, `random`: for tests
 * @property {(handle: any) => void} [clearTimeout]
 * @property {() => number} [now]
 * @property {() => number} [random]
 * @property {number} [pingInterval]
 * @property {number} [pongTimeout]
 * @property {number} [connectTimeout]
 * @property {number} [requestTimeout]
 * @property {number} [commandGrace]
 * @property {number} [minDelay]
 * @property {number} [maxDelay]
 * @property {number} [stableAfter]
 * @property {number} [refreshBefore]
 * @property {number} [queueLimit]
 * @property {number} [maxMessageBytes]
 */
/** @typedef {"state"|"error"|"resume"} ListenerKind */
/**
 * One socket to the server, with the token it carries (the one it was opened with, or the
 * last one handed over in band); `refreshing` while a new token is on its way to it.
 * @typedef {{ws: WebSocket, token: string|null, openedAt: number, draining: boolean,
 *            refreshing?: boolean}} Connection
 */
/**
 * A request waiting for its answer (queued while `conn` is null).
 * @typedef {{id: string, text: string, resolve: (message: Envelope) => void,
 *            reject: (error: SysManageError) => void, timer?: unknown,
 *            conn: Connection|null, onAnswer?: (message: Envelope) => void}} PendingRequest
 */
/**
 * A renewal of a subscription waiting for its answer: `since` was sent (if known); events of
 * the channel that arrive meanwhile wait in `buffer` (the server may replay them, in order).
 * @typedef {{since: StreamPosition|null, reason: ResumeReport["reason"], buffer: Envelope[]}} Resumption
 */
/**
 * `position` is the last place in the stream the subscription saw (the latest event, or the
 * subscribe response); `seenAt` the server time of it; `answered` whether the server ever
 * confirmed the subscription; `resuming` a renewal in flight.
 * @typedef {{channel: string, filters: object|null, handler: EventHandler,
 *            ready: Promise<Envelope>, resolve: (message: Envelope) => void,
 *            reject: (error: SysManageError) => void, position?: StreamPosition|null,
 *            seenAt?: string|null, answered?: boolean, resuming?: Resumption|null}} Subscription
 */

/**
 * What failed requests reject with. `code` is the server's `data.code` (`COMMAND_FAILED`,
 * `INVALID_FILTERS`, `RATE_LIMITED`...) or a client code: `TIMEOUT`, `DISCONNECTED`,
 * `QUEUE_FULL`, `MESSAGE_TOO_LARGE`, `CLOSED`, `UNAUTHENTICATED`, `REPLACED`.
 * `data` is the server's `data` (e.g. `execution_id`, `retry_after`); `server` is true
 * when the server sent the error.
 */
export class SysManageError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{data?: JsonObject, channel?: string|null, server?: boolean}} [details]
   */
  constructor(code, message, { data = {}, channel = null, server = false } = {}) {
    super(message);
    this.name = "SysManageError";
    this.code = code;
    this.data = data;
    this.channel = channel;
    this.server = server;
  }
}

/**
 * The expiry of a JSON Web Token, from its `exp` claim (the signature is not checked).
 * @param {string|null} token
 * @returns {number|null} milliseconds since the epoch, or null
 */
export function decodeJwtExpiry(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const payload = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")));
    return typeof payload?.exp === "number" && Number.isFinite(payload.exp) ? payload.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * `/ws` on the page's host: `wss:` for `https:` pages, `ws:` otherwise.
 * @param {{protocol: string, host: string}} [loc] default `location`
 * @returns {string}
 */
export function websocketUrl(loc = globalThis.location) {
  if (!loc) throw new Error("SysManageClient: no `url` option and no `location` to derive it from");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/**
 * Reconnection delay, exponential with full jitter: uniform in [0, min(maxDelay, minDelay * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {number} minDelay
 * @param {number} maxDelay
 * @param {() => number} [random]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, minDelay, maxDelay, random = Math.random) {
  return Math.floor(random() * Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 30)));
}

/**
 * Whether a parsed server message has the envelope shape: an object with string `type` and
 * `channel`, an object `data`, and an `id` (if any) that is a string or a number.
 * @param {unknown} m
 * @returns {m is Envelope}
 */
export function isEnvelope(m) {
  /** @type {(v: unknown) => v is Record<string, any>} */
  const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  return isObject(m) && typeof m.type === "string" && typeof m.channel === "string" &&
    isObject(m.data) && (m.id == null || typeof m.id === "string" || typeof m.id === "number");
}

/**
 * A connection to `/ws` that survives network trouble and token expiry. Its `state` is
 * `closed` (not started, or stopped by `close()`), `connecting`, `open`, `offline`
 * (waiting to retry) or `unauthenticated` (stopped: log in again, then `connect()`).
 */
export class SysManageClient {
  /**
   * @param {ClientOptions} [options] all optional; times in ms; the numbers default to {@link DEFAULTS}:
   *   `pingInterval`, `pongTimeout`, `connectTimeout`, `requestTimeout`, `commandGrace` (added
   *   to a shell command's timeout), `minDelay`/`maxDelay` (backoff), `stableAfter` (resets
   *   the backoff), `refreshBefore` (new token this long before expiry, or at 90% of the time
   *   left), `queueLimit`, `maxMessageBytes`; `url`, `getToken`, `WebSocketImpl`, and
   *   `setTimeout`, `clearTimeout`, `now`, `random` (for tests): see {@link ClientOptions}
   */
  constructor(options = {}) {
    const o = (this.options = { ...DEFAULTS, ...options });
    this.url = o.url || websocketUrl();
    /** @type {ClientState} */
    this.state = "closed";
    this._WebSocket = o.WebSocketImpl || globalThis.WebSocket;
    this._getToken = o.getToken || (async () => null);
    this._setTimeout = o.setTimeout || ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = o.clearTimeout || ((handle) => globalThis.clearTimeout(handle));
    this._now = o.now || (() => Date.now());
    this._random = o.random || Math.random;
    /** @type {Connection|null} */
    this._conn = null; // the connection in use: {ws, token, openedAt, draining}
    /** @type {Connection|null} */
    this._next = null; // a connection opening with a fresh token, to take over
    /** @type {Set<Connection>} */
    this._draining = new Set(); // replaced connections that still owe replies
    /** @type {Map<string, Subscription>} */
    this._subs = new Map(); // channel -> {channel, filters, handler, ready}
    /** @type {Map<string|number, PendingRequest>} */
    this._pending = new Map(); // id -> {id, text, resolve, reject, timer, conn}
    /** @type {PendingRequest[]} */
    this._queue = []; // pending requests not sent yet
    /** @type {Record<string, unknown>} */
    this._timers = {};
    /** @type {Record<ListenerKind, Set<(...args: any[]) => void>>} */
    this._listeners = { state: new Set(), error: new Set(), resume: new Set() };
    this._attempt = this._gen = this._seq = this._emptyTokens = 0;
    this._skew = 0; // server clock minus local clock
    this._needAuth = false;
    this._inBand = true; // false once a server did not know the `refresh` message
    this._idPrefix = Math.floor(Math.random() * 36 ** 4).toString(36) + "-";
  }

  /** Start connecting (only when `closed` or `unauthenticated`). @returns {this} */
  connect() {
    if (this.state === "closed" || this.state === "unauthenticated") {
      this._attempt = this._emptyTokens = 0;
      this._needAuth = false;
      this._start();
    }
    return this;
  }

  /** While `offline`, retry now instead of waiting for the backoff delay. */
  reconnectNow() { if (this.state === "offline") this._start(); }

  /** Close the connection and stop reconnecting; pending requests reject with `CLOSED`. */
  close() { this._stop("closed", new SysManageError("CLOSED", "The client was closed")); }

  /**
   * Call `cb(state, info)` on every state change. For `offline`, `info` has `retryIn` (ms),
   * `retryAt` (epoch ms), `attempt`, and the `code`/`reason` of the close, if any.
   * @param {(state: ClientState, info: StateInfo) => void} cb
   * @returns {() => void} removes the listener
   */
  onStateChange(cb) { return this._listen("state", cb); }

  /**
   * Call `cb({code, message, channel, data})` for errors not tied to a pending request:
   * server errors such as AUTH_FAILED or SLOW_CONSUMER, refused subscriptions, and
   * client-side problems (TOKEN_UNAVAILABLE, CONNECT_FAILED, MALFORMED_MESSAGE).
   * @param {(error: ErrorReport) => void} cb
   * @returns {() => void} removes the listener
   */
  onError(cb) { return this._listen("error", cb); }

  /**
   * Call `cb({channel, status, reason, snapshot, from, to, position})` each time a
   * subscription is renewed after it was confirmed once: after a reconnect, and after the
   * server said events may have been missed (`events_missed`). `status` is `recovered` when
   * the server replays the missed events to the handler, `rebuild` when they are lost.
   * @param {(report: ResumeReport) => void} cb
   * @returns {() => void} removes the listener
   */
  onResume(cb) { return this._listen("resume", cb); }

  /**
   * Send a message with a new `id` and wait for the `response` (or `pong`) with that id.
   * Queued while not connected. Rejects with a {@link SysManageError} on an `error` with
   * that id, on timeout, or when the connection that carried it is lost (`DISCONNECTED`).
   * @param {OutgoingMessage} message
   * @param {{timeout?: number}} [options] default `requestTimeout`
   * @returns {Promise<Envelope>} the whole response message
   */
  request(message, { timeout = this.options.requestTimeout } = {}) {
    return this._request(message, timeout);
  }

  /**
   * {@link request}, with `onAnswer` called with the answer as soon as it arrives (before any
   * later message is handled; the promise settles later).
   * @param {OutgoingMessage} message
   * @param {number} timeout
   * @param {(message: Envelope) => void} [onAnswer]
   * @returns {Promise<Envelope>}
   */
  _request(message, timeout, onAnswer) {
    if (this.state === "closed" || this.state === "unauthenticated") {
      return Promise.reject(new SysManageError(this.state.toUpperCase(), `The client is ${this.state}`));
    }
    const id = this._nextId();
    const text = JSON.stringify({ ...message, id });
    if (new TextEncoder().encode(text).length > this.options.maxMessageBytes) {
      return Promise.reject(new SysManageError("MESSAGE_TOO_LARGE", "The message exceeds the server's size limit"));
    }
    return new Promise((resolve, reject) => {
      /** @type {PendingRequest} */
      const entry = { id, text, resolve, reject, conn: null, onAnswer };
      entry.timer = this._setTimeout(
        () => this._settle(id, new SysManageError("TIMEOUT", `No answer within ${timeout} ms`)), timeout);
      this._pending.set(id, entry);
      this._transmit(entry);
    });
  }

  /**
   * Send a command: `command_execution` {host_id, command, timeout},
   * `package_operations` {host_id, operation, package}, `system_alerts` {action, alert_id}.
   * A shell command waits for its own `timeout` (seconds, default 30) plus `commandGrace`.
   * @param {string} channel
   * @param {JsonObject} data
   * @param {{timeout?: number}} [options]
   * @returns {Promise<JsonObject>} the `data` of the response
   */
  async command(channel, data, { timeout } = {}) {
    timeout ??= channel === "command_execution"
      ? (Number(data?.timeout) || 30) * 1000 + this.options.commandGrace : this.options.requestTimeout;
    return (await this.request({ type: "command", channel, data }, { timeout })).data;
  }

  /**
   * Subscribe to a channel, now and again after every reconnect, with the same filters
   * (and, when the server gave stream positions, from where the stream stopped: see
   * `onResume`). `handler(data, message)` gets each `event` and `status` snapshot of the
   * channel, never the same event twice; `message.type` tells which. Subscribing again to a
   * channel replaces its filters and handler. A subscription the server refuses is dropped
   * and reported to `onError`.
   * @overload
   * @param {string} channel
   * @param {object|null|undefined} filters
   * @param {EventHandler} handler
   * @returns {Unsubscribe} call it to unsubscribe;
   *   `.ready` resolves with the first `response` (the filters in force) or rejects if refused
   */
  /**
   * Subscribe without filters: `subscribe(channel, handler)`.
   * @overload
   * @param {string} channel
   * @param {EventHandler} handler
   * @returns {Unsubscribe}
   */
  /**
   * @param {string} channel
   * @param {object|null|undefined|EventHandler} filters
   * @param {EventHandler} [handler]
   * @returns {Unsubscribe}
   */
  subscribe(channel, filters, handler) {
    if (typeof filters === "function") [handler, filters] = [/** @type {EventHandler} */ (filters), null];
    const sub = /** @type {Subscription} */ ({ channel, filters: filters || null, handler });
    sub.ready = new Promise((resolve, reject) => Object.assign(sub, { resolve, reject }));
    sub.ready.catch(() => {}); // awaiting it is optional
    this._subs.get(channel)?.reject(new SysManageError("REPLACED", `Subscription to ${channel} replaced`));
    this._subs.set(channel, sub);
    if (this.state === "open") this._sendSubscribe(sub);
    const unsubscribe = () => this._unsubscribe(sub);
    unsubscribe.ready = sub.ready;
    return unsubscribe;
  }

  // -- connecting ------------------------------------------------------------------------

  async _start() {
    const gen = ++this._gen;
    this._clear("retry");
    this._setState("connecting");
    let token;
    try {
      token = (await this._getToken()) || null;
    } catch (/** @type {any} */ err) {
      if (gen !== this._gen) return;
      this._report("TOKEN_UNAVAILABLE", `Could not get an access token: ${err?.message ?? err}`);
      return this._scheduleRetry();
    }
    if (gen !== this._gen) return;
    if (this._needAuth) { // the last connection was refused for its credentials
      this._emptyTokens = token ? 0 : this._emptyTokens + 1;
      if (this._emptyTokens >= 2) return this._stop("unauthenticated", new SysManageError("UNAUTHENTICATED", "Not logged in"));
    }
    const conn = (this._conn = this._open(token));
    if (!conn) return this._scheduleRetry();
    this._timer("watchdog", this.options.connectTimeout, () => this._lost(conn, "Connection timed out"));
  }

  /**
   * @param {string|null} token
   * @returns {Connection|null}
   */
  _open(token) {
    /** @type {Connection} */
    const conn = { ws: /** @type {any} */ (null), token, openedAt: 0, draining: false }; // ws: just below
    try { // the token travels as a subprotocol, never in the URL
      conn.ws = new this._WebSocket(this.url, token ? ["bearer", token] : undefined);
    } catch (/** @type {any} */ err) {
      this._report("CONNECT_FAILED", `Cannot open a WebSocket: ${err?.message ?? err}`);
      return null;
    }
    conn.ws.onopen = () => this._onOpen(conn);
    conn.ws.onmessage = (event) => this._onMessage(conn, event.data);
    conn.ws.onclose = (event) => this._onClose(conn, event.code, event.reason);
    conn.ws.onerror = () => {}; // a close event follows
    return conn;
  }

  /** @param {Connection} conn */
  _onOpen(conn) {
    if (conn === this._next) { // a fresh token: take over, let the old connection drain
      const old = this._conn;
      [this._conn, this._next] = [conn, null];
      if (old) this._retire(old);
    } else if (conn !== this._conn) return;
    conn.openedAt = this._now();
    this._clear("watchdog");
    this._setState("open");
    this._schedulePing();
    this._scheduleRefresh(conn.token);
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    for (const entry of this._queue.splice(0)) this._transmit(entry);
  }

  /**
   * @param {Connection} conn
   * @param {number} code
   * @param {string} reason
   */
  _onClose(conn, code, reason) {
    this._detach(conn);
    if (conn.draining) return void this._draining.delete(conn);
    if (conn === this._next) { // the replacement failed; try again later
      this._next = null;
      return void (this._conn && this._scheduleRefresh(this._conn.token));
    }
    if (conn !== this._conn) return;
    if (this._next) this._detach(this._next);
    this._conn = this._next = null;
    ["watchdog", "ping", "refresh"].forEach((name) => this._clear(name));
    if (conn.openedAt && this._now() - conn.openedAt >= this.options.stableAfter) this._attempt = 0;
    if (code === 4029) this._attempt = Math.max(this._attempt, 3); // rate limited: slow down
    // too many failed handshakes from this address, or too many sockets of this user
    if (code === 4403 || code === 4429) this._attempt = Math.max(this._attempt, 5);
    this._needAuth = code === 4001 || code === 4003 || code === 4403;
    this._scheduleRetry({ code, reason });
  }

  /**
   * Give up on a connection that does not answer, and reconnect.
   * @param {Connection} conn
   * @param {string} reason
   */
  _lost(conn, reason) {
    this._detach(conn, CLOSE_NO_ANSWER, reason);
    this._onClose(conn, CLOSE_NO_ANSWER, reason);
  }

  /**
   * Stop listening to a connection, close it, and fail the requests sent on it.
   * @param {Connection} conn
   */
  _detach(conn, code = 1000, reason = "") {
    const ws = conn.ws;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(code, reason); } catch { /* closed already */ }
    for (const entry of [...this._pending.values()]) {
      if (entry.conn === conn) this._settle(entry.id, new SysManageError("DISCONNECTED", "The connection was lost before the reply"));
    }
  }

  /** @param {StateInfo} [info] */
  _scheduleRetry(info = {}) {
    const delay = backoffDelay(this._attempt++, this.options.minDelay, this.options.maxDelay, this._random);
    this._timer("retry", delay, () => this._start());
    this._setState("offline", { ...info, retryIn: delay, retryAt: this._now() + delay, attempt: this._attempt });
  }

  /**
   * @param {ClientState} state
   * @param {SysManageError} err
   */
  _stop(state, err) {
    this._gen++; // cancels a getToken() in progress
    Object.keys(this._timers).forEach((name) => this._clear(name));
    const conns = /** @type {Connection[]} */ ([this._conn, this._next, ...this._draining].filter(Boolean));
    this._conn = this._next = null;
    this._draining.clear();
    this._queue = [];
    for (const id of [...this._pending.keys()]) this._settle(id, err);
    conns.forEach((conn) => this._detach(conn));
    this._setState(state);
  }

  // -- token refresh ---------------------------------------------------------------------

  /** @param {string|null} token */
  _scheduleRefresh(token) {
    const expiry = decodeJwtExpiry(token);
    if (expiry == null) return;
    const remaining = expiry - (this._now() + this._skew);
    const delay = remaining - Math.min(this.options.refreshBefore, remaining / 10);
    if (delay >= 1000) this._timer("refresh", delay, () => this._refresh());
  }

  /**
   * Get a fresh token and hand it to the open connection (`refresh`); with a server that
   * does not know `refresh`, open a second connection with it, which takes over once open.
   */
  async _refresh() {
    const [conn, gen] = [this._conn, this._gen];
    if (!conn || conn.refreshing || this._next || this.state !== "open") return;
    conn.refreshing = true;
    this._clear("refresh");
    let token = null;
    try {
      token = await this._getToken();
    } catch (/** @type {any} */ err) {
      this._report("TOKEN_UNAVAILABLE", `Could not refresh the access token: ${err?.message ?? err}`);
    }
    conn.refreshing = false;
    if (gen !== this._gen || conn !== this._conn || this._next) return;
    if (!token || token === conn.token) return this._scheduleRefresh(conn.token); // try again later
    if (!this._inBand) return void (this._next = this._open(token));
    this._refreshInBand(conn, token);
  }

  /**
   * Send `refresh` with `token` on `conn`. Refused (AUTH_FAILED), the server closes the
   * connection (4001) and the usual reconnection follows; not understood (UNKNOWN_TYPE, an
   * older server), a second connection takes over; anything else: try again later.
   * @param {Connection} conn
   * @param {string} token
   */
  async _refreshInBand(conn, token) {
    conn.refreshing = true;
    try {
      await this.request({ type: "refresh", channel: "system", data: { token } });
      conn.token = token;
    } catch (/** @type {any} */ err) {
      if (err.code === "UNKNOWN_TYPE") this._inBand = false;
      if (err.code === "AUTH_FAILED") return;
    } finally {
      conn.refreshing = false;
    }
    if (conn !== this._conn || this._next) return;
    if (!this._inBand) this._next = this._open(token);
    else this._scheduleRefresh(conn.token);
  }

  /** @param {Connection} conn */
  _retire(conn) {
    conn.draining = true;
    this._draining.add(conn);
    this._closeIfDrained(conn);
  }

  /** @param {Connection} conn */
  _closeIfDrained(conn) {
    for (const entry of this._pending.values()) if (entry.conn === conn) return;
    this._draining.delete(conn);
    this._detach(conn, 1000, "Replaced");
  }

  // -- messages --------------------------------------------------------------------------

  /**
   * @param {Connection} conn
   * @param {unknown} raw
   */
  _onMessage(conn, raw) {
    let msg = null;
    try { msg = typeof raw === "string" ? JSON.parse(raw) : null; } catch { /* reported below */ }
    if (!isEnvelope(msg)) return this._report("MALFORMED_MESSAGE", "Ignored a malformed message from the server");
    const entry = msg.id != null ? this._pending.get(msg.id) : undefined;
    const reply = entry?.conn === conn && ["response", "pong", "error"].includes(msg.type);
    if (conn.draining) return void (reply && this._answer(entry, msg)); // only what it owes
    if (conn !== this._conn) return;
    this._clear("watchdog"); // the connection is alive
    if (msg.type !== "error") { // the server accepted our credentials
      this._needAuth = false;
      this._emptyTokens = 0;
    }
    if (msg.type === "pong" || msg.type === "response") {
      const serverTime = Date.parse(/** @type {string} */ (msg.timestamp)); // NaN if missing
      if (!Number.isNaN(serverTime)) this._skew = serverTime - this._now();
    }
    if (reply) return this._answer(entry, msg);
    if (msg.type === "error") {
      // The server ended a subscription (the user lost the right): do not renew it.
      if (msg.data.code === "SUBSCRIPTION_REVOKED") this._subs.delete(msg.channel);
      return this._emit("error", errorInfo(msg));
    }
    if (msg.type === "status" && msg.channel === "system" && msg.data.event === "token_expiring") {
      return void this._refresh(); // the server's clock says the token expires soon
    }
    if (isEventsMissed(msg)) return this._resumeAll("events_missed");
    if (msg.type === "event" || msg.type === "status") {
      const sub = this._subs.get(msg.channel);
      if (sub) this._deliver(sub, msg);
    }
  }

  /**
   * @param {PendingRequest} entry
   * @param {Envelope} msg
   */
  _answer(entry, msg) {
    if (msg.type !== "error") return this._settle(entry.id, null, msg);
    const { code, message } = errorInfo(msg);
    this._settle(entry.id, new SysManageError(code, message, { data: msg.data, channel: msg.channel, server: true }));
  }

  /** @param {PendingRequest} entry */
  _transmit(entry) {
    if (this.state === "open" && this._conn) {
      entry.conn = this._conn;
      return this._conn.ws.send(entry.text);
    }
    this._queue.push(entry);
    if (this._queue.length > this.options.queueLimit) {
      this._settle(this._queue[0].id, new SysManageError("QUEUE_FULL", "Dropped: too many requests waiting for a connection"));
    }
  }

  /**
   * @param {string|number} id
   * @param {SysManageError|null} err
   * @param {Envelope} [value] the answer, when there is no error
   */
  _settle(id, err, value) {
    const entry = this._pending.get(id);
    if (!entry) return;
    this._pending.delete(id);
    this._clearTimeout(entry.timer);
    const queued = this._queue.indexOf(entry);
    if (queued >= 0) this._queue.splice(queued, 1);
    if (err) entry.reject(err);
    else {
      if (entry.onAnswer) this._call(entry.onAnswer, value);
      entry.resolve(/** @type {Envelope} */ (value));
    }
    if (entry.conn?.draining && this._draining.has(entry.conn)) this._closeIfDrained(entry.conn);
  }

  /**
   * @param {Subscription} sub
   * @param {ResumeReport["reason"]} [reason] why a subscription confirmed before is renewed
   */
  _sendSubscribe(sub, reason = "reconnected") {
    /** @type {OutgoingMessage} */
    const message = { type: "subscribe", channel: sub.channel };
    if (sub.filters) message.filters = sub.filters;
    const resuming = this._startResume(sub, message, reason);
    // The answer is handled at once: the events that follow it depend on it.
    this._request(message, this.options.requestTimeout, (reply) => this._subscribed(sub, reply, resuming))
      .then(sub.resolve, (err) => {
        this._abandonResume(sub, resuming);
        this._subscribeFailed(sub, err);
      });
  }

  /**
   * @param {Subscription} sub
   * @param {SysManageError} err
   */
  _subscribeFailed(sub, err) {
    if (this._subs.get(sub.channel) !== sub || !err.server) return; // renewed after reconnecting
    if (err.code === "RATE_LIMITED" || err.code === "TOKEN_EXPIRED") { // keep it; send it again
      if (err.code === "TOKEN_EXPIRED") this._refresh();
      const retry = () => this._subs.get(sub.channel) === sub && this.state === "open" && this._sendSubscribe(sub);
      return void this._setTimeout(retry, Math.max(100, 1000 * (Number(err.data.retry_after) || 1)));
    }
    this._subs.delete(sub.channel);
    sub.reject(err);
    this._emit("error", { code: err.code, message: err.message, channel: sub.channel, data: err.data });
  }

  /**
   * @param {Subscription} sub
   * @returns {Promise<void>}
   */
  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return Promise.resolve();
    this._subs.delete(sub.channel);
    if (this.state !== "open") return Promise.resolve();
    return this.request({ type: "unsubscribe", channel: sub.channel }).then(() => {}, () => {});
  }

  // -- resuming streams --------------------------------------------------------------------

  /**
   * Renewing a subscription the server confirmed before: ask for the events after the last
   * position seen (`since`), and hold back the channel's events until the answer.
   * @param {Subscription} sub
   * @param {OutgoingMessage} message the subscribe message, given `since` here
   * @param {ResumeReport["reason"]} reason
   * @returns {Resumption|null} null for a first subscription
   */
  _startResume(sub, message, reason) {
    if (!sub.answered) return null;
    const since = sub.position ?? null;
    if (since) message.since = since;
    return (sub.resuming = { since, reason, buffer: [] });
  }

  /**
   * The server confirmed a subscription: note its position; after a renewal, tell the page
   * whether the missed events follow (`recovered`) or its state must be rebuilt.
   * @param {Subscription} sub
   * @param {Envelope} reply
   * @param {Resumption|null} resuming
   */
  _subscribed(sub, reply, resuming) {
    if (this._subs.get(sub.channel) !== sub) return; // replaced or ended meanwhile
    const position = streamPosition(reply.data.position);
    const at = typeof reply.timestamp === "string" ? reply.timestamp : null;
    if (!resuming) {
      Object.assign(sub, { answered: true, position, seenAt: at });
      return;
    }
    if (sub.resuming !== resuming) return; // a later renewal took over (a new connection)
    sub.resuming = null;
    const recovered = reply.data.recovered === true && resuming.since !== null;
    const from = sub.seenAt ?? null;
    if (!recovered) { // nothing is replayed: what arrived meanwhile is all there is
      for (const msg of resuming.buffer) this._deliver(sub, msg);
      Object.assign(sub, { position, seenAt: at });
    } // else: the replay that follows brings the held-back events again, in order
    const snapshot = (reply.data.recovered === false ? SNAPSHOT_CHANNELS : LEGACY_SNAPSHOT_CHANNELS).has(sub.channel);
    /** @type {ResumeReport} */
    const report = recovered
      ? { channel: sub.channel, status: "recovered", reason: resuming.reason, snapshot: false, from, to: at, position: resuming.since }
      : { channel: sub.channel, status: "rebuild", reason: resuming.reason, snapshot, from, to: at, position };
    this._emit("resume", report);
  }

  /**
   * A renewal that got no answer (refused, or its connection closed): deliver the events
   * held back, which no replay will bring.
   * @param {Subscription} sub
   * @param {Resumption|null} resuming
   */
  _abandonResume(sub, resuming) {
    if (!resuming || sub.resuming !== resuming) return;
    sub.resuming = null;
    if (this._subs.get(sub.channel) === sub) for (const msg of resuming.buffer) this._deliver(sub, msg);
  }

  /**
   * Hand an event or snapshot to the subscription's handler, unless it is a duplicate (an
   * offset not after the last one seen in the same epoch) or must wait for a renewal.
   * @param {Subscription} sub
   * @param {Envelope} msg
   */
  _deliver(sub, msg) {
    if (msg.type === "event") {
      if (sub.resuming?.since) return void sub.resuming.buffer.push(msg);
      const position = streamPosition(msg);
      const last = sub.position;
      if (position && last && position.epoch === last.epoch && position.offset <= last.offset) return;
      if (position) sub.position = position;
      if (typeof msg.timestamp === "string") sub.seenAt = msg.timestamp;
    }
    this._call(sub.handler, msg.data, msg);
  }

  /**
   * The server may have lost events (`events_missed`): renew every confirmed subscription
   * from its position, on the same connection.
   * @param {ResumeReport["reason"]} reason
   */
  _resumeAll(reason) {
    if (this.state !== "open") return;
    for (const sub of this._subs.values()) if (sub.answered && !sub.resuming) this._sendSubscribe(sub, reason);
  }

  _schedulePing() {
    this._timer("ping", this.options.pingInterval, () => {
      const conn = this._conn;
      if (this.state !== "open" || !conn) return;
      conn.ws.send(JSON.stringify({ type: "ping", id: this._nextId() }));
      if (!("watchdog" in this._timers)) {
        this._timer("watchdog", this.options.pongTimeout, () => this._lost(conn, "No pong from the server"));
      }
      this._schedulePing();
    });
  }

  // -- small helpers ---------------------------------------------------------------------

  _nextId() { return this._idPrefix + (++this._seq).toString(36); }

  /**
   * @param {string} name
   * @param {number} ms
   * @param {() => void} fn
   */
  _timer(name, ms, fn) {
    this._clear(name);
    this._timers[name] = this._setTimeout(() => { delete this._timers[name]; fn(); }, ms);
  }

  /** @param {string} name */
  _clear(name) {
    if (name in this._timers) this._clearTimeout(this._timers[name]);
    delete this._timers[name];
  }

  /**
   * @param {ClientState} state
   * @param {StateInfo} [info]
   */
  _setState(state, info = {}) {
    if (state === this.state && state !== "offline") return;
    this.state = state;
    this._emit("state", state, info);
  }

  /**
   * @param {ListenerKind} kind
   * @param {(...args: any[]) => void} cb
   * @returns {() => void}
   */
  _listen(kind, cb) { this._listeners[kind].add(cb); return () => this._listeners[kind].delete(cb); }

  /**
   * @param {ListenerKind} kind
   * @param {...any} args
   */
  _emit(kind, ...args) { for (const cb of [...this._listeners[kind]]) this._call(cb, ...args); }

  /**
   * @param {string} code
   * @param {string} message
   */
  _report(code, message) { this._emit("error", { code, message, channel: null, data: {} }); }

  /**
   * @param {(...args: any[]) => void} fn
   * @param {...any} args
   */
  _call(fn, ...args) {
    try { fn(...args); } catch (err) { console.error("sysmanage-client: a callback threw", err); }
  }
}

/**
 * A stream position (`{epoch, offset}`: an event envelope, or a response's `position`), if
 * well-formed: a non-empty string epoch and a non-negative integer offset.
 * @param {unknown} value
 * @returns {StreamPosition|null}
 */
function streamPosition(value) {
  if (value === null || typeof value !== "object") return null;
  const { epoch, offset } = /** @type {Record<string, unknown>} */ (value);
  return typeof epoch === "string" && epoch !== "" && Number.isSafeInteger(offset) && /** @type {number} */ (offset) >= 0
    ? { epoch, offset: /** @type {number} */ (offset) } : null;
}

/**
 * Whether a message is the server's notice that events may have been missed.
 * @param {Envelope} msg
 */
function isEventsMissed(msg) {
  return msg.type === "status" && msg.channel === "system" && msg.data.event === "events_missed";
}

/**
 * @param {Envelope} msg
 * @returns {ErrorReport}
 */
function errorInfo(msg) {
  const code = typeof msg.data.code === "string" ? msg.data.code : "ERROR";
  const message = typeof msg.data.message === "string" ? msg.data.message : code;
  return { code, message, channel: msg.channel, data: msg.data };
}
