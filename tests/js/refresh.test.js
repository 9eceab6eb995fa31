// In-band token refresh: the client hands its open socket a new access token (`refresh`)
// before the current one expires, when the server warns (`token_expiring`), and when a
// subscription is refused because the token expired (`TOKEN_EXPIRED`).
import assert from "node:assert/strict";
import { test } from "node:test";
import { capture, connected, makeJwt, reopen, setup } from "./fakes.js";

/** getToken handing out tokens that live `lifetime` seconds from the fake clock's now. */
function tokenSource(t, lifetime = 900) {
  const issued = [];
  const getToken = async () => {
    issued.push(makeJwt({ exp: Math.floor(t.clock.now() / 1000) + lifetime, n: issued.length }));
    return issued.at(-1);
  };
  return { issued, getToken };
}

/** A connected client whose tokens come from tokenSource(); subscribed to host_status. */
async function refreshing(lifetime = 900, options = {}) {
  const t = setup({ getToken: (...args) => source.getToken(...args), pingInterval: 1e9, ...options });
  const source = tokenSource(t, lifetime);
  t.seen = [];
  t.client.subscribe("host_status", null, (data) => t.seen.push(data.n));
  t.client.connect();
  await t.clock.tick();
  t.last().open();
  t.last().reply(t.last().sent[0]);
  await t.clock.tick();
  return Object.assign(t, source);
}

const warning = (secondsLeft = 60) => ({
  type: "status", channel: "system",
  data: { event: "token_expiring", expires_at: "2023-11-14T22:28:20.000Z", seconds_left: secondsLeft,
    message: `The access token expires in ${secondsLeft} s; send a 'refresh' with a new access token to keep this connection` },
});

test("before the token expires, the open socket gets a fresh token in band: no new socket", async () => {
  const t = await refreshing();
  const ws = t.last();
  await t.clock.tick(839_000);
  assert.deepEqual(ws.sentOfType("refresh"), []);
  await t.clock.tick(1_000); // 60 s before expiry
  const [refresh] = ws.sentOfType("refresh");
  assert.deepEqual({ ...refresh, id: null }, { type: "refresh", channel: "system", data: { token: t.issued[1] }, id: null });
  ws.reply(refresh, { action: "refresh", status: "refreshed", expires_at: "…" });
  await t.clock.tick();
  ws.receive({ type: "event", channel: "host_status", data: { n: "after" } });
  assert.deepEqual(t.seen, ["after"]);
  assert.equal(t.sockets.length, 1);
  assert.equal(ws.sentOfType("subscribe").length, 1, "the subscription carries on, not renewed");
  assert.deepEqual(t.states.map((s) => s.state), ["connecting", "open"]);
  await t.clock.tick(840_000); // the next refresh follows the new token's expiry
  assert.equal(ws.sentOfType("refresh").length, 2);
  assert.equal(ws.sentOfType("refresh")[1].data.token, t.issued[2]);
  assert.equal(t.errors.length, 0);
});

test("the server's token_expiring warning starts a refresh at once, only one at a time", async () => {
  const t = await refreshing();
  const ws = t.last();
  ws.receive(warning());
  ws.receive(warning()); // a second one while the first refresh is under way
  await t.clock.tick();
  assert.equal(t.issued.length, 2);
  const [refresh] = ws.sentOfType("refresh");
  assert.equal(ws.sentOfType("refresh").length, 1);
  assert.deepEqual(t.seen, [], "the warning is not an event of any subscription");
  ws.reply(refresh, { action: "refresh", status: "refreshed" });
  await t.clock.tick();
  assert.equal(t.errors.length, 0);
  await t.clock.tick(839_000); // the timer was re-armed for the new token
  assert.equal(ws.sentOfType("refresh").length, 1);
  await t.clock.tick(1_000);
  assert.equal(ws.sentOfType("refresh").length, 2);
});

test("a refused refresh is not retried: the server closes (4001) and the client reconnects with a new token", async () => {
  const t = await refreshing();
  const ws = t.last();
  ws.receive(warning());
  await t.clock.tick();
  const [refresh] = ws.sentOfType("refresh");
  ws.receive({ type: "error", channel: "system", id: refresh.id,
    data: { code: "AUTH_FAILED", message: "The new access token belongs to another user", action: "reconnect_with_valid_token" } });
  await t.clock.tick();
  ws.serverClose(4001);
  const next = await reopen(t);
  assert.deepEqual(next.protocols, ["bearer", t.issued[2]]);
  assert.equal(ws.sentOfType("refresh").length, 1);
  assert.equal(t.client.state, "open");
});

test("a refresh that gets no answer is tried again later on the same socket", async () => {
  const t = await refreshing(900, { requestTimeout: 5_000 });
  const ws = t.last();
  await t.clock.tick(840_000);
  assert.equal(ws.sentOfType("refresh").length, 1);
  await t.clock.tick(5_000); // TIMEOUT: the old token still has 55 s; next try at 90% of that
  await t.clock.tick(49_500);
  assert.equal(ws.sentOfType("refresh").length, 2);
  assert.equal(t.sockets.length, 1);
});

test("a subscription refused because the token expired is kept, a refresh starts, and it is sent again", async () => {
  const t = await refreshing();
  const ws = t.last();
  const alerts = capture(t.client.subscribe("system_alerts", null, () => {}).ready);
  await t.clock.tick();
  const subscribe = ws.sentOfType("subscribe").at(-1);
  ws.receive({ type: "error", channel: "system", id: subscribe.id,
    data: { code: "TOKEN_EXPIRED", message: "The access token expired; send a 'refresh' with a new access token first",
      action: "refresh", grace_ends_at: "2023-11-14T22:28:50.000Z" } });
  await t.clock.tick();
  const [refresh] = ws.sentOfType("refresh");
  ws.reply(refresh, { action: "refresh", status: "refreshed" });
  await t.clock.tick(1_000);
  const again = ws.sentOfType("subscribe").at(-1);
  assert.notEqual(again.id, subscribe.id);
  assert.equal(again.channel, "system_alerts");
  ws.reply(again, { action: "subscribe", status: "subscribed", channel: "system_alerts", filters: {} });
  await t.clock.tick();
  assert.equal(alerts.value.data.status, "subscribed");
  assert.deepEqual(t.errors, []);
});

test("a page on its session (no token) never sends refresh", async () => {
  const t = await connected({ pingInterval: 1e9 });
  t.last().receive(warning()); // not sent to session sockets; harmless if it came
  await t.clock.tick(3_600_000);
  assert.deepEqual(t.last().sentOfType("refresh"), []);
});
