import assert from "node:assert/strict";
import { test } from "node:test";
import { SysManageError } from "../../static/js/sysmanage-client.js";
import { capture, connected, setup } from "./fakes.js";

test("responses are matched to requests by id, whatever their order", async () => {
  const { client, last } = await connected();
  const ws = last();
  const first = client.request({ type: "subscribe", channel: "host_status" });
  const second = client.request({ type: "subscribe", channel: "fleet_status" });
  const [a, b] = ws.sent;
  assert.notEqual(a.id, b.id);
  assert.ok(typeof a.id === "string" && a.id.length <= 16);
  ws.reply(b, { channel: "fleet_status" });
  ws.reply(a, { channel: "host_status" });
  assert.equal((await first).data.channel, "host_status");
  assert.equal((await second).data.channel, "fleet_status");
});

test("an error with an id rejects that request only", async () => {
  const { client, last, errors } = await connected();
  const ws = last();
  const ok = client.request({ type: "subscribe", channel: "host_status" });
  const bad = client.request({ type: "subscribe", channel: "user_activity" });
  const [a, b] = ws.sent;
  const rejected = assert.rejects(bad, (err) => err instanceof SysManageError && err.code === "SUBSCRIPTION_FAILED" &&
    err.message === "Insufficient permissions" && err.data.requested_channel === "user_activity" &&
    err.channel === "subscription" && err.server === true);
  ws.receive({ type: "error", channel: "subscription", id: b.id,
    data: { code: "SUBSCRIPTION_FAILED", message: "Insufficient permissions", requested_channel: "user_activity" } });
  await rejected;
  ws.reply(a, { status: "subscribed" });
  assert.equal((await ok).data.status, "subscribed");
  assert.deepEqual(errors, []);
});

test("a request without an answer times out; a late answer is ignored", async () => {
  const { client, clock, last } = await connected({ requestTimeout: 5000, pingInterval: 1e9 });
  const pending = client.request({ type: "unsubscribe", channel: "host_metrics" });
  let settled = false;
  pending.catch(() => (settled = true));
  await clock.tick(4999);
  assert.equal(settled, false);
  await clock.tick(1);
  await assert.rejects(pending, { code: "TIMEOUT" });
  last().reply(last().sent[0]); // nothing happens
  assert.equal(client.state, "open");
});

test("command() resolves with the response data and waits the command timeout plus a grace", async () => {
  const { client, clock, last } = await connected({ pingInterval: 1e9 });
  const ws = last();
  const run = client.command("command_execution", { host_id: "h1", command: "uptime", timeout: 60 });
  const sent = ws.sent[0];
  assert.deepEqual({ ...sent, id: undefined },
    { type: "command", channel: "command_execution", data: { host_id: "h1", command: "uptime", timeout: 60 }, id: undefined });
  await clock.tick(60_000 + 39_000); // longer than requestTimeout, shorter than 60 s + 40 s
  ws.reply(sent, { execution_id: "e1", status: "completed", exit_code: 0, stdout: "up" });
  assert.deepEqual(await run, { execution_id: "e1", status: "completed", exit_code: 0, stdout: "up" });

  const slow = capture(client.command("command_execution", { host_id: "h1", command: "sleep 99" }));
  await clock.tick(69_999); // default command timeout 30 s + 40 s
  assert.equal(slow.settled, false);
  await clock.tick(1);
  assert.equal(slow.error?.code, "TIMEOUT");

  const pkg = capture(client.command("package_operations", { host_id: "h1", operation: "install", package: "nginx" }, { timeout: 1000 }));
  await clock.tick(1000);
  assert.equal(pkg.error?.code, "TIMEOUT");
});

test("COMMAND_FAILED rejects the command with the server's details", async () => {
  const { client, last } = await connected();
  const ws = last();
  const run = assert.rejects(client.command("command_execution", { host_id: "h1", command: "uptime" }),
    (err) => err.code === "COMMAND_FAILED" && err.data.execution_id === "e9");
  ws.receive({ type: "error", channel: "command_execution", id: ws.sent[0].id,
    data: { code: "COMMAND_FAILED", message: "Host not reachable: web-01 is offline", host_id: "h1", execution_id: "e9" } });
  await run;
});

test("alert actions go to system_alerts", async () => {
  const { client, last } = await connected();
  const ack = client.command("system_alerts", { action: "acknowledge", alert_id: "a1" });
  const sent = last().sent[0];
  assert.equal(sent.channel, "system_alerts");
  last().reply(sent, { action: "acknowledge", alert_id: "a1", status: "acknowledged" });
  assert.equal((await ack).status, "acknowledged");
});

test("requests made while offline are queued, then sent in order after re-subscribing", async () => {
  const { client, clock, sockets, last } = await connected();
  client.subscribe("host_status", { host_id: "h1" }, () => {});
  last().reply(last().sent[0], { status: "subscribed" });
  last().serverClose(1006);
  assert.equal(client.state, "offline");
  const replies = [1, 2, 3].map((n) => capture(client.command("system_alerts", { action: "resolve", alert_id: `a${n}` })));
  await clock.tick(500); // the first retry: random 0.5 * minDelay
  assert.equal(sockets.length, 2);
  const ws = last();
  assert.equal(ws.sent.length, 0);
  ws.open();
  await clock.tick();
  assert.deepEqual(ws.sent.map((m) => m.type === "command" ? m.data.alert_id : `${m.type}:${m.channel}`),
    ["subscribe:host_status", "a1", "a2", "a3"]);
  ws.sent.slice(1).forEach((m) => ws.reply(m, { alert_id: m.data.alert_id, status: "resolved" }));
  await clock.tick();
  assert.deepEqual(replies.map((r) => r.value.alert_id), ["a1", "a2", "a3"]);
});

test("the offline queue is bounded: the oldest request is dropped with QUEUE_FULL", async () => {
  const { client, clock, last } = await connected({ queueLimit: 3 });
  last().serverClose(1006);
  const replies = [1, 2, 3, 4, 5].map((n) => capture(client.command("system_alerts", { action: "resolve", alert_id: `a${n}` })));
  await clock.tick();
  assert.deepEqual(replies.map((r) => r.error?.code ?? null), ["QUEUE_FULL", "QUEUE_FULL", null, null, null]);
  await clock.tick(500);
  last().open();
  await clock.tick();
  assert.deepEqual(last().sent.map((m) => m.data.alert_id), ["a3", "a4", "a5"]);
});

test("a queued request still times out, and is then not sent", async () => {
  const { client, clock, last } = await connected({ requestTimeout: 5000, minDelay: 60_000, maxDelay: 60_000 });
  last().serverClose(1006);
  const late = capture(client.request({ type: "unsubscribe", channel: "host_status" }));
  await clock.tick(5000);
  assert.equal(late.error?.code, "TIMEOUT");
  await clock.tick(30_000);
  last().open();
  await clock.tick();
  assert.deepEqual(last().sent, []);
});

test("a request in flight rejects with DISCONNECTED when its connection drops", async () => {
  const { client, last } = await connected();
  const inflight = assert.rejects(client.request({ type: "subscribe", channel: "fleet_status" }), { code: "DISCONNECTED" });
  last().serverClose(1011);
  await inflight;
});

test("messages over the size limit are refused before sending", async () => {
  const { client, last } = await connected({ maxMessageBytes: 100 });
  await assert.rejects(client.command("command_execution", { host_id: "h", command: "x".repeat(200) }),
    { code: "MESSAGE_TOO_LARGE" });
  assert.equal(last().sent.length, 0);
});

test("requests before connect() or after close() reject at once", async () => {
  const { client } = setup();
  await assert.rejects(client.request({ type: "ping" }), { code: "CLOSED" });
});
