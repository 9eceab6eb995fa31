// Test doubles for the browser client: a controllable clock and a scriptable WebSocket.
import { SysManageClient } from "../../static/js/sysmanage-client.js";

/** Let pending promise callbacks run (a real macrotask turn). */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** Where every fake clock starts (epoch ms). */
export const START = 1_700_000_000_000;

/** A fake clock: timers run only when the test advances time with tick(). */
export class FakeClock {
  constructor(start = START) {
    this.time = start;
    this.timers = new Map();
    this.seq = 0;
    this.now = () => this.time;
    this.setTimeout = (fn, ms = 0) => {
      const id = ++this.seq;
      this.timers.set(id, { id, at: this.time + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (id) => void this.timers.delete(id);
  }

  /** Advance time by `ms`, running due timers in order and flushing promises between them. */
  async tick(ms = 0) {
    const target = this.time + ms;
    for (;;) {
      await flush();
      let next = null;
      for (const t of this.timers.values()) {
        if (t.at <= target && (!next || t.at < next.at || (t.at === next.at && t.id < next.id))) next = t;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.time = next.at;
      next.fn();
    }
    this.time = target;
    await flush();
  }

  /** Milliseconds until each pending timer fires, soonest first. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }
}

/** A WebSocket whose server side the test plays: open(), receive(), serverClose(). */
export class FakeWebSocket {
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    this.closedWith = { code, reason };
    const onclose = this.onclose;
    if (onclose) queueMicrotask(() => onclose({ code, reason }));
  }

  // -- the server's side --
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: typeof message === "string" ? message : JSON.stringify(message) });
  }

  receiveRaw(data) {
    this.onmessage?.({ data });
  }

  /** Answer a client message with a `response` (or another type) carrying its id. */
  reply(request, data = {}, type = "response") {
    this.receive({ type, channel: request.channel ?? "system", data, id: request.id,
      timestamp: new Date(this.serverNow()).toISOString() });
  }

  /** The server's clock: the test clock shifted by `serverSkew` when set up with one. */
  serverNow() {
    return Date.now();
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  sentOfType(type) {
    return this.sent.filter((m) => m.type === type);
  }
}

/** A base64url JSON Web Token (unsigned) with the given claims. */
export function makeJwt(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2lnbmF0dXJl`;
}

/** A client wired to a fake clock and fake sockets, recording states and errors. */
export function setup({ serverSkew = 0, ...options } = {}) {
  const clock = new FakeClock();
  const sockets = [];
  class WS extends FakeWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }

    serverNow() {
      return clock.now() + serverSkew;
    }
  }
  const client = new SysManageClient({
    url: "ws://fleet.test/ws",
    WebSocketImpl: WS,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    ...options,
  });
  const states = [];
  const errors = [];
  client.onStateChange((state, info) => states.push({ state, ...info }));
  client.onError((error) => errors.push(error));
  return { client, clock, sockets, states, errors, last: () => sockets.at(-1) };
}

/** setup() plus connect() and an opened first socket. */
export async function connected(options = {}) {
  const t = setup(options);
  t.client.connect();
  await t.clock.tick();
  t.last().open();
  await t.clock.tick();
  return t;
}

/** Record how a promise settles, without leaving a rejection unhandled. */
export function capture(promise) {
  const result = { settled: false, value: undefined, error: undefined };
  promise.then(
    (value) => Object.assign(result, { settled: true, value }),
    (error) => Object.assign(result, { settled: true, error }),
  );
  return result;
}

/** Run timers, one due time at a time, until the client opens a new socket; open it. */
export async function reopen({ clock, sockets }, { open = true, limit = 600_000 } = {}) {
  const before = sockets.length;
  for (let waited = 0; sockets.length === before;) {
    const next = clock.pending()[0];
    if (next === undefined || waited + next > limit) throw new Error("the client did not reconnect");
    waited += next;
    await clock.tick(next);
  }
  const ws = sockets.at(-1);
  if (open) {
    ws.open();
    await clock.tick();
  }
  return ws;
}
