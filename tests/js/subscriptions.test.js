import assert from "node:assert/strict";
import { test } from "node:test";
import { connected, reopen, setup } from "./fakes.js";

const HOST = "ab26edfe-3f79-4943-a6a6-44bbc0c415e1";

test("subscribe sends the filters; the handler gets the status snapshot and events", async () => {
  const { client, last } = await connected();
  const ws = last();
  const seen = [];
  const unsubscribe = client.subscribe("host_status", { host_id: HOST }, (data, message) => seen.push([message.type, data]));
  const sent = ws.sent[0];
  assert.deepEqual({ ...sent, id: "x" }, { type: "subscribe", channel: "host_status", filters: { host_id: HOST }, id: "x" });
  ws.reply(sent, { action: "subscribe", status: "subscribed", channel: "host_status", filters: { host_id: HOST } });
  ws.reply(sent, { hosts: [{ host_id: HOST, status: "online" }] }, "status");
  ws.receive({ type: "event", channel: "host_status", data: { host_id: HOST, status: "offline" } });
  ws.receive({ type: "event", channel: "fleet_status", data: { total_hosts: 1 } }); // not subscribed
  assert.deepEqual(seen, [
    ["status", { hosts: [{ host_id: HOST, status: "online" }] }],
    ["event", { host_id: HOST, status: "offline" }],
  ]);
  assert.deepEqual((await unsubscribe.ready).data.filters, { host_id: HOST });
});

test("subscribe without filters sends none; unsubscribe stops delivery and tells the server", async () => {
  const { client, last } = await connected();
  const ws = last();
  const seen = [];
  const unsubscribe = client.subscribe("fleet_status", (data) => seen.push(data));
  assert.equal("filters" in ws.sent[0], false);
  ws.reply(ws.sent[0]);
  const done = unsubscribe();
  const sent = ws.sent[1];
  assert.equal(sent.type, "unsubscribe");
  assert.equal(sent.channel, "fleet_status");
  ws.receive({ type: "event", channel: "fleet_status", data: { total_hosts: 2 } });
  ws.reply(sent, { status: "unsubscribed", was_subscribed: true });
  await done;
  assert.deepEqual(seen, []);
});

test("subscriptions are renewed with the same filters after every reconnect", async () => {
  const t = await connected();
  const { client, last, sockets } = t;
  client.subscribe("package_operations", { host_id: HOST }, () => {});
  client.subscribe("system_alerts", { severity: ["warning", "critical"] }, () => {});
  const dropped = client.subscribe("host_metrics", { host_id: HOST, metrics: ["cpu"] }, () => {});
  dropped();
  for (let round = 0; round < 2; round++) {
    last().serverClose(1006);
    await reopen(t);
    assert.deepEqual(last().sent.map(({ type, channel, filters }) => ({ type, channel, filters })), [
      { type: "subscribe", channel: "package_operations", filters: { host_id: HOST } },
      { type: "subscribe", channel: "system_alerts", filters: { severity: ["warning", "critical"] } },
    ]);
  }
  assert.equal(sockets.length, 3);
});

test("subscribing again to a channel replaces its filters and handler", async () => {
  const t = await connected();
  const { client, last } = t;
  const first = [];
  const second = [];
  const oldUnsubscribe = client.subscribe("command_execution", { host_id: HOST }, (d) => first.push(d));
  client.subscribe("command_execution", null, (d) => second.push(d));
  assert.equal((await oldUnsubscribe.ready.catch((e) => e)).code, "REPLACED");
  last().receive({ type: "event", channel: "command_execution", data: { execution_id: "e1" } });
  assert.deepEqual([first, second], [[], [{ execution_id: "e1" }]]);
  oldUnsubscribe(); // no effect on the replacement
  last().serverClose(1006);
  await reopen(t);
  assert.deepEqual(last().sent.map((m) => [m.channel, m.filters]), [["command_execution", undefined]]);
});

test("a refused subscription is dropped, reported, and not renewed", async () => {
  const t = await connected();
  const { client, last, errors } = t;
  const unsubscribe = client.subscribe("user_activity", null, () => {});
  const ready = assert.rejects(unsubscribe.ready, { code: "SUBSCRIPTION_FAILED" });
  last().receive({ type: "error", channel: "subscription", id: last().sent[0].id,
    data: { code: "SUBSCRIPTION_FAILED", message: "Insufficient permissions for channel 'user_activity'" } });
  await ready;
  assert.deepEqual(errors.map((e) => [e.code, e.channel, e.message]),
    [["SUBSCRIPTION_FAILED", "user_activity", "Insufficient permissions for channel 'user_activity'"]]);
  last().serverClose(1006);
  await reopen(t);
  assert.deepEqual(last().sent, []);
});

test("a rate-limited subscription is sent again after retry_after", async () => {
  const { client, clock, last } = await connected();
  client.subscribe("fleet_status", null, () => {});
  last().receive({ type: "error", channel: "system", id: last().sent[0].id,
    data: { code: "RATE_LIMITED", message: "Too many messages", retry_after: 0.25 } });
  await clock.tick(249);
  assert.equal(last().sent.length, 1);
  await clock.tick(1);
  assert.equal(last().sentOfType("subscribe").length, 2);
});

test("subscriptions made before connecting are sent once the socket opens", async () => {
  const { client, clock, last } = setup();
  client.subscribe("fleet_status", null, () => {});
  client.connect();
  await clock.tick();
  assert.deepEqual(last().sent, []);
  last().open();
  assert.deepEqual(last().sent.map((m) => m.channel), ["fleet_status"]);
});

test("a handler that throws does not break the client", async (t) => {
  const { client, last } = await connected();
  t.mock.method(console, "error", () => {});
  const seen = [];
  client.subscribe("host_status", null, () => { throw new Error("boom"); });
  client.subscribe("fleet_status", null, (d) => seen.push(d));
  last().receive({ type: "event", channel: "host_status", data: {} });
  last().receive({ type: "event", channel: "fleet_status", data: { total_hosts: 3 } });
  assert.deepEqual(seen, [{ total_hosts: 3 }]);
  assert.equal(console.error.mock.callCount(), 1);
});

test("a subscription the server revokes is reported, dropped and not renewed after a reconnect", async () => {
  const t = await connected();
  const { client, last, errors } = t;
  const seen = [];
  client.subscribe("user_activity", null, (data) => seen.push(data));
  client.subscribe("fleet_status", null, () => {});
  for (const sent of last().sent) last().reply(sent);
  last().receive({ type: "error", channel: "user_activity", timestamp: new Date().toISOString(),
    data: { code: "SUBSCRIPTION_REVOKED", message: "Subscription to 'user_activity' ended", requested_channel: "user_activity" } });
  last().receive({ type: "event", channel: "user_activity", data: { action: "login" } });
  assert.deepEqual(seen, []);
  assert.deepEqual(errors.map(({ code, channel }) => ({ code, channel })),
    [{ code: "SUBSCRIPTION_REVOKED", channel: "user_activity" }]);
  last().serverClose(1006);
  await reopen(t);
  assert.deepEqual(last().sent.map(({ type, channel }) => ({ type, channel })),
    [{ type: "subscribe", channel: "fleet_status" }]);
});
