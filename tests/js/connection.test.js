import assert from "node:assert/strict";
import { test } from "node:test";
import { capture, connected, makeJwt, reopen, setup, START } from "./fakes.js";

const offlineDelays = (states) => states.filter((s) => s.state === "offline").map((s) => s.retryIn);

test("state changes: connecting, open, offline (with the retry delay), connecting, open, closed", async () => {
  const t = await connected();
  t.last().serverClose(1011, "server error");
  const offline = t.states.at(-1);
  assert.equal(offline.retryAt, t.clock.now() + offline.retryIn);
  assert.equal(offline.code, 1011);
  await reopen(t);
  t.client.close();
  assert.deepEqual(t.states.map((s) => s.state), ["connecting", "open", "offline", "connecting", "open", "closed"]);
});

test("the token goes in the bearer subprotocol, never in the URL; no token means session auth", async () => {
  const token = makeJwt({ exp: 2_000_000_000 });
  const withToken = await connected({ getToken: async () => token });
  assert.deepEqual(withToken.last().protocols, ["bearer", token]);
  assert.equal(withToken.last().url, "ws://fleet.test/ws");
  const session = await connected();
  assert.equal(session.last().protocols, undefined);
});

test("reconnect delays grow exponentially with full jitter, up to maxDelay", async () => {
  const fractions = [0, 0.999, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5];
  let i = 0;
  const t = setup({ random: () => fractions[i++ % fractions.length], connectTimeout: 1e9 });
  t.client.connect();
  await t.clock.tick();
  for (let n = 0; n < 8; n++) {
    t.last().serverClose(1006); // refused before opening
    await reopen(t, { open: false });
  }
  const delays = offlineDelays(t.states);
  assert.deepEqual(delays, [0, 1998, 2000, 4000, 8000, 15000, 15000, 15000]);
  delays.forEach((d, n) => assert.ok(d >= 0 && d < Math.min(30000, 1000 * 2 ** n)));
});

test("the backoff starts over after a connection that stayed up", async () => {
  const t = await connected({ stableAfter: 10_000 });
  t.last().serverClose(1006);
  await reopen(t); // opened, then dropped at once: not stable
  t.last().serverClose(1006);
  await reopen(t);
  await t.clock.tick(10_000);
  t.last().serverClose(1006);
  assert.deepEqual(offlineDelays(t.states), [500, 1000, 500]);
});

test("close code 4029 (rate limited) waits longer before reconnecting", async () => {
  const t = await connected();
  t.last().serverClose(4029);
  assert.deepEqual(offlineDelays(t.states), [4000]);
});

for (const code of [4403, 4429]) {
  test(`close code ${code} (too many failed handshakes, or sockets) waits longer still`, async () => {
    const t = await connected();
    t.last().serverClose(code);
    assert.deepEqual(offlineDelays(t.states), [15000]); // half of 30 s (random 0.5)
  });
}

test("a ping is sent every pingInterval; a missing pong closes the socket and reconnects", async () => {
  const t = await connected({ pingInterval: 25_000, pongTimeout: 10_000 });
  const ws = t.last();
  await t.clock.tick(25_000);
  const [ping] = ws.sentOfType("ping");
  assert.ok(ping && ping.id);
  ws.reply(ping, {}, "pong");
  await t.clock.tick(25_000);
  assert.equal(ws.sentOfType("ping").length, 2);
  await t.clock.tick(9_999);
  assert.equal(t.client.state, "open");
  await t.clock.tick(1);
  assert.equal(ws.closedWith.code, 4000);
  assert.equal(t.client.state, "offline");
  const next = await reopen(t);
  assert.notEqual(next, ws);
  assert.equal(t.client.state, "open");
});

test("any message from the server counts as a sign of life", async () => {
  const t = await connected({ pingInterval: 25_000, pongTimeout: 10_000 });
  await t.clock.tick(30_000);
  t.last().receive({ type: "event", channel: "fleet_status", data: {} });
  await t.clock.tick(9_000);
  assert.equal(t.client.state, "open");
});

test("a socket that never opens is abandoned after connectTimeout", async () => {
  const t = setup({ connectTimeout: 15_000 });
  t.client.connect();
  await t.clock.tick(14_999);
  assert.equal(t.client.state, "connecting");
  await t.clock.tick(1);
  assert.equal(t.client.state, "offline");
  assert.equal(t.sockets[0].closedWith.code, 4000);
});

test("with a server that does not know `refresh`, a new socket with a fresh token takes over seamlessly", async () => {
  const issued = [];
  const getToken = async () => {
    issued.push(makeJwt({ exp: Math.floor(t.clock.now() / 1000) + 900, n: issued.length }));
    return issued.at(-1);
  };
  const t = setup({ getToken, pingInterval: 1e9 });
  const { client, clock, sockets } = t;
  const seen = [];
  client.subscribe("host_status", { host_id: "h1" }, (d) => seen.push(d.n));
  client.connect();
  await clock.tick();
  const first = sockets[0];
  first.open();
  first.reply(first.sent[0]);
  await clock.tick(830_000);
  assert.equal(sockets.length, 1);
  const inflight = capture(client.command("system_alerts", { action: "resolve", alert_id: "a1" }));
  const command = first.sent[1];
  await clock.tick(10_000); // 60 s before expiry
  assert.equal(issued.length, 2);
  const [refresh] = first.sentOfType("refresh"); // tried in band first; an older server:
  first.receive({ type: "error", channel: "system", id: refresh.id,
    data: { code: "UNKNOWN_TYPE", message: "Unknown message type 'refresh'" } });
  await clock.tick();
  assert.equal(sockets.length, 2);
  const second = sockets[1];
  assert.deepEqual(second.protocols, ["bearer", issued[1]]);
  second.open();
  await clock.tick();
  assert.deepEqual(second.sent.map((m) => [m.type, m.channel, m.filters]), [["subscribe", "host_status", { host_id: "h1" }]]);
  assert.equal(first.closedWith, null, "the old socket stays until it has answered");
  first.receive({ type: "event", channel: "host_status", data: { n: "old" } }); // ignored: replaced
  second.receive({ type: "event", channel: "host_status", data: { n: "new" } });
  first.reply(command, { status: "resolved" });
  await clock.tick();
  assert.deepEqual(inflight.value, { status: "resolved" });
  assert.deepEqual(first.closedWith, { code: 1000, reason: "Replaced" });
  assert.deepEqual(seen, ["new"]);
  assert.deepEqual(t.states.map((s) => s.state), ["connecting", "open"]);
  await clock.tick(840_000); // and again before the second token expires, at once
  assert.equal(sockets.length, 3);
  assert.deepEqual(second.sentOfType("refresh"), []);
});

test("a refresh that yields the same token keeps the connection and waits for the server", async () => {
  const token = makeJwt({ exp: START / 1000 + 120 });
  let calls = 0;
  const t = await connected({ getToken: async () => (calls++, token), pingInterval: 1e9 });
  await t.clock.tick(119_999);
  assert.equal(calls, 4); // at connect, then at 90% of the time left, three times
  await t.clock.tick(60_000);
  assert.equal(calls, 4, "no more refresh attempts this close to expiry");
  assert.equal(t.sockets.length, 1);
  assert.equal(t.client.state, "open");
});

test("the refresh time follows the server's clock, learned from reply timestamps", async () => {
  let calls = 0;
  let t;
  const getToken = async () => (calls++, makeJwt({ exp: Math.floor((t.clock.now() + 600_000) / 1000) + 900 }));
  t = setup({ getToken, serverSkew: 600_000, pingInterval: 1e9 }); // the server is 10 minutes ahead
  t.client.subscribe("fleet_status", null, () => {});
  t.client.connect();
  await t.clock.tick();
  t.last().open();
  t.last().reply(t.last().sent[0]); // teaches the client the server's time
  t.last().serverClose(1006);
  await reopen(t);
  assert.equal(calls, 2);
  await t.clock.tick(839_000); // 60 s before expiry by the server's clock (exp is whole seconds)
  assert.equal(calls, 2);
  await t.clock.tick(1_000);
  assert.equal(calls, 3);
});

test("close 4001: getToken is called again and the new token is used", async () => {
  const tokens = [makeJwt({ exp: 2_000_000_000, n: 1 }), makeJwt({ exp: 2_000_000_000, n: 2 })];
  let calls = 0;
  const t = await connected({ getToken: async () => tokens[calls++] });
  t.last().receive({ type: "error", channel: "system",
    data: { code: "AUTH_FAILED", message: "JWT token expired", action: "reconnect_with_valid_token" } });
  t.last().serverClose(4001);
  assert.deepEqual(t.errors.map((e) => [e.code, e.message]), [["AUTH_FAILED", "JWT token expired"]]);
  const ws = await reopen(t);
  assert.equal(calls, 2);
  assert.deepEqual(ws.protocols, ["bearer", tokens[1]]);
  assert.equal(t.client.state, "open");
});

test("close 4001 and no token twice in a row: state unauthenticated, no more reconnects", async () => {
  let calls = 0;
  const t = await connected({ getToken: async () => (calls++ === 0 ? makeJwt({ exp: 2_000_000_000 }) : null) });
  t.last().serverClose(4001);
  await reopen(t); // no token: tries the session once
  const pending = capture(t.client.request({ type: "subscribe", channel: "fleet_status" }));
  t.last().serverClose(4001);
  await t.clock.tick(60_000);
  assert.equal(t.client.state, "unauthenticated");
  assert.equal(calls, 3);
  assert.equal(t.sockets.length, 2);
  assert.equal(pending.error.code, "DISCONNECTED");
  const after = capture(t.client.request({ type: "subscribe", channel: "fleet_status" }));
  await t.clock.tick();
  assert.equal(after.error.code, "UNAUTHENTICATED");
  t.client.connect(); // e.g. after logging in again
  await t.clock.tick();
  assert.equal(t.sockets.length, 3);
});

test("a getToken failure is reported and retried with backoff", async () => {
  let fail = true;
  const t = setup({ getToken: async () => { if (fail) throw new Error("network down"); return null; } });
  t.client.connect();
  await t.clock.tick();
  assert.equal(t.client.state, "offline");
  assert.equal(t.errors[0].code, "TOKEN_UNAVAILABLE");
  fail = false;
  await reopen(t);
  assert.equal(t.client.state, "open");
});

test("malformed messages are ignored and reported; the client keeps working", async () => {
  const t = await connected();
  const ws = t.last();
  const seen = [];
  t.client.subscribe("fleet_status", null, (d) => seen.push(d));
  for (const raw of ["not json", "[1,2]", "null", '{"type":"event","data":{}}',
    '{"type":"event","channel":"fleet_status","data":[]}', '{"type":"event","channel":"fleet_status","data":{},"id":{}}']) {
    ws.receiveRaw(raw);
  }
  ws.receiveRaw(new ArrayBuffer(4));
  ws.receive({ type: "event", channel: "fleet_status", data: { total_hosts: 1 } });
  assert.deepEqual(seen, [{ total_hosts: 1 }]);
  assert.equal(t.errors.length, 7);
  assert.ok(t.errors.every((e) => e.code === "MALFORMED_MESSAGE"));
  assert.equal(t.client.state, "open");
});

test("server errors without a request go to onError (e.g. SLOW_CONSUMER), then it reconnects", async () => {
  const t = await connected();
  t.last().receive({ type: "error", channel: "system",
    data: { code: "SLOW_CONSUMER", message: "Too many undelivered messages; reconnect and resubscribe" } });
  t.last().serverClose(4008);
  assert.deepEqual(t.errors.map((e) => e.code), ["SLOW_CONSUMER"]);
  await reopen(t);
  assert.equal(t.client.state, "open");
});

test("close() stops everything: pending requests reject and nothing reconnects", async () => {
  const t = await connected();
  const inflight = capture(t.client.request({ type: "subscribe", channel: "fleet_status" }));
  t.client.close();
  await t.clock.tick(600_000);
  assert.equal(inflight.error.code, "CLOSED");
  assert.deepEqual(t.sockets[0].closedWith, { code: 1000, reason: "" });
  assert.equal(t.sockets.length, 1);
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.clock.pending(), []);
});

test("close() while offline or while fetching a token cancels the reconnect", async () => {
  const t = await connected();
  t.last().serverClose(1006);
  t.client.close();
  await t.clock.tick(600_000);
  assert.equal(t.sockets.length, 1);

  let release;
  const slow = setup({ getToken: () => new Promise((resolve) => (release = resolve)) });
  slow.client.connect();
  await slow.clock.tick();
  slow.client.close();
  release("token");
  await slow.clock.tick(600_000);
  assert.equal(slow.sockets.length, 0);
  assert.equal(slow.client.state, "closed");
});

test("reconnectNow() skips the wait while offline", async () => {
  const t = await connected({ minDelay: 30_000 });
  t.last().serverClose(1006);
  t.client.reconnectNow();
  await t.clock.tick();
  assert.equal(t.sockets.length, 2);
});
