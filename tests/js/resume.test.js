// Resuming streams: `since` on renewals, replayed events, duplicates, rebuilds, events_missed.
import assert from "node:assert/strict";
import { test } from "node:test";
import { connected, reopen } from "./fakes.js";

const HOST = "ab26edfe-3f79-4943-a6a6-44bbc0c415e1";
const EPOCH = "k3J9";

/** An event of `channel` at `offset` (in `epoch`), as a server that resumes streams sends it. */
const event = (channel, offset, data = {}, epoch = EPOCH, timestamp = new Date(1_700_000_000_000 + offset).toISOString()) =>
  ({ type: "event", channel, data: { n: offset, ...data }, timestamp, offset, epoch });

/** A subscribe response, with the channel's position when given. */
const subscribed = (request, extra = {}) =>
  ({ action: "subscribe", status: "subscribed", channel: request.channel, filters: request.filters ?? {}, ...extra });

/** A connected client with one subscription (confirmed at `offset`), recording what the page sees. */
async function withSubscription(channel, filters, { offset = 10, options = {} } = {}) {
  const t = await connected({ pingInterval: 1e9, ...options });
  const seen = [];
  const resumes = [];
  t.client.onResume((report) => resumes.push(report));
  t.client.subscribe(channel, filters, (data, message) => seen.push(message.type === "event" ? data.n : `${message.type}:${JSON.stringify(data)}`));
  const request = t.last().sent[0];
  t.last().reply(request, subscribed(request, offset === null ? {} : { position: { epoch: EPOCH, offset } }));
  await t.clock.tick();
  return { ...t, seen, resumes };
}

const subscribesOf = (ws) => ws.sentOfType("subscribe");

test("after a reconnect, a subscription that saw no event resumes from its subscribe response's position", async () => {
  const t = await withSubscription("package_operations", { host_id: HOST }, { offset: 41 });
  t.last().serverClose(1006);
  const ws = await reopen(t);
  const [renewal] = subscribesOf(ws);
  assert.deepEqual({ ...renewal, id: "x" },
    { type: "subscribe", channel: "package_operations", filters: { host_id: HOST }, since: { epoch: EPOCH, offset: 41 }, id: "x" });
});

test("resuming from the last event: the replay reaches the handler, duplicates never do", async () => {
  const t = await withSubscription("command_execution", { host_id: HOST });
  const first = t.last();
  first.receive(event("command_execution", 12));
  first.receive(event("command_execution", 15));
  first.receive(event("command_execution", 15)); // the same event again
  first.receive(event("command_execution", 14)); // older than the last one seen
  first.serverClose(1006);
  const ws = await reopen(t);
  const [renewal] = subscribesOf(ws);
  assert.deepEqual(renewal.since, { epoch: EPOCH, offset: 15 });
  ws.reply(renewal, subscribed(renewal, { recovered: true, position: { epoch: EPOCH, offset: 18 } }));
  for (const offset of [15, 16, 18, 16, 19]) ws.receive(event("command_execution", offset));
  await t.clock.tick();
  assert.deepEqual(t.seen, [12, 15, 16, 18, 19]);
  assert.equal(t.resumes.length, 1);
  const [report] = t.resumes;
  assert.deepEqual({ ...report, to: typeof report.to },
    { channel: "command_execution", status: "recovered", reason: "reconnected", snapshot: false,
      from: new Date(1_700_000_000_015).toISOString(), to: "string", position: { epoch: EPOCH, offset: 15 } });
  ws.serverClose(1006); // the next resume starts after the last event delivered
  assert.deepEqual(subscribesOf(await reopen(t))[0].since, { epoch: EPOCH, offset: 19 });
});

test("recovered: false on a state channel: the page is told to rebuild from the snapshot that follows", async () => {
  const t = await withSubscription("system_alerts", { severity: ["critical"] });
  t.last().receive(event("system_alerts", 11, { status: "open" }));
  t.last().serverClose(4008);
  const ws = await reopen(t);
  const [renewal] = subscribesOf(ws);
  assert.deepEqual(renewal.since, { epoch: EPOCH, offset: 11 });
  ws.reply(renewal, subscribed(renewal, { recovered: false, position: { epoch: "new", offset: 3 } }));
  ws.reply(renewal, { alerts: [{ alert_id: "a1", status: "resolved" }] }, "status");
  ws.receive(event("system_alerts", 4, {}, "new"));
  ws.receive(event("system_alerts", 3, {}, "new")); // not after the response's position
  await t.clock.tick();
  assert.deepEqual(t.seen, [11, 'status:{"alerts":[{"alert_id":"a1","status":"resolved"}]}', 4]);
  const [report] = t.resumes;
  assert.equal(report.status, "rebuild");
  assert.equal(report.snapshot, true);
  assert.equal(report.from, new Date(1_700_000_000_011).toISOString());
  assert.equal(report.to, new Date(t.clock.now()).toISOString());
  assert.deepEqual(report.position, { epoch: "new", offset: 3 });
  ws.serverClose(1006);
  assert.deepEqual(subscribesOf(await reopen(t))[0].since, { epoch: "new", offset: 4 });
});

test("recovered: false on host_metrics: a gap to back-fill, from the last event to the renewal", async () => {
  const t = await withSubscription("host_metrics", { host_id: HOST });
  const lastReport = "2026-11-25T22:34:54.257Z";
  t.last().receive(event("host_metrics", 30, {}, EPOCH, lastReport));
  t.last().serverClose(1006);
  await t.clock.tick(3_000);
  const ws = await reopen(t);
  const [renewal] = subscribesOf(ws);
  ws.reply(renewal, subscribed(renewal, { recovered: false, position: { epoch: EPOCH, offset: 90 } }));
  await t.clock.tick();
  assert.deepEqual(t.resumes.map(({ channel, status, snapshot, from }) => ({ channel, status, snapshot, from })),
    [{ channel: "host_metrics", status: "rebuild", snapshot: false, from: lastReport }]);
  assert.equal(Date.parse(t.resumes[0].to), t.clock.now());
});

test("events_missed: every confirmed subscription resumes on the same socket; held-back events are replayed in order", async () => {
  const t = await withSubscription("system_alerts", null);
  const ws = t.last();
  t.client.subscribe("host_status", null, () => {});
  ws.reply(ws.sent[1], subscribed(ws.sent[1], { position: { epoch: EPOCH, offset: 7 } }));
  ws.receive(event("system_alerts", 11));
  await t.clock.tick();
  ws.receive({ type: "status", channel: "system", timestamp: new Date().toISOString(),
    data: { event: "events_missed", message: "events may be missing", since: "x", until: "y" } });
  const renewals = subscribesOf(ws).slice(2);
  assert.deepEqual(renewals.map(({ channel, since }) => [channel, since]),
    [["system_alerts", { epoch: EPOCH, offset: 11 }], ["host_status", { epoch: EPOCH, offset: 7 }]]);
  // A live event sent before the server took the renewal, then the replay from offset 11.
  ws.receive(event("system_alerts", 14));
  ws.reply(renewals[0], subscribed(renewals[0], { recovered: true, position: { epoch: EPOCH, offset: 14 } }));
  for (const offset of [12, 13, 14, 15]) ws.receive(event("system_alerts", offset));
  await t.clock.tick();
  assert.deepEqual(t.seen, [11, 12, 13, 14, 15]);
  assert.deepEqual(t.resumes.map(({ channel, status, reason }) => [channel, status, reason]),
    [["system_alerts", "recovered", "events_missed"]]);
  assert.equal(ws.closedWith, null, "the socket stays open");
});

test("events_missed answered with recovered: false: the held-back events are delivered, then the rebuild", async () => {
  const t = await withSubscription("user_activity", null);
  const ws = t.last();
  ws.receive({ type: "status", channel: "system", data: { event: "events_missed" } });
  const [renewal] = subscribesOf(ws).slice(1);
  ws.receive(event("user_activity", 12));
  assert.deepEqual(t.seen, []);
  ws.reply(renewal, subscribed(renewal, { recovered: false, position: { epoch: "e2", offset: 20 } }));
  await t.clock.tick();
  assert.deepEqual(t.seen, [12]);
  assert.deepEqual(t.resumes.map(({ status, snapshot }) => [status, snapshot]), [["rebuild", false]]);
});

test("a renewal the server refuses hands over the held-back events", async () => {
  const t = await withSubscription("system_alerts", null);
  const ws = t.last();
  ws.receive({ type: "status", channel: "system", data: { event: "events_missed" } });
  const [renewal] = subscribesOf(ws).slice(1);
  ws.receive(event("system_alerts", 11));
  ws.receive({ type: "error", channel: "subscription", id: renewal.id,
    data: { code: "SUBSCRIPTION_FAILED", message: "Insufficient permissions", requested_channel: "system_alerts" } });
  await t.clock.tick();
  assert.deepEqual(t.seen, [11]);
  assert.deepEqual(t.errors.map((e) => e.code), ["SUBSCRIPTION_FAILED"]);
  assert.deepEqual(t.resumes, []);
});

test("close 4008 (too slow): the client reconnects with backoff and resumes every stream", async () => {
  const t = await withSubscription("package_operations", { host_id: HOST });
  t.last().receive(event("package_operations", 11));
  t.last().serverClose(4008);
  assert.equal(t.client.state, "offline");
  assert.ok(t.states.at(-1).retryIn > 0, "waits before reconnecting");
  const ws = await reopen(t);
  const [renewal] = subscribesOf(ws);
  assert.deepEqual(renewal.since, { epoch: EPOCH, offset: 11 });
  ws.reply(renewal, subscribed(renewal, { recovered: true, position: { epoch: EPOCH, offset: 13 } }));
  ws.receive(event("package_operations", 12));
  ws.receive(event("package_operations", 13));
  await t.clock.tick();
  assert.deepEqual(t.seen, [11, 12, 13]);
  assert.equal(t.resumes[0].status, "recovered");
});

test("an event from a new epoch is taken whatever its offset, and the stream goes on from it", async () => {
  const t = await withSubscription("host_status", null, { offset: 500 });
  t.last().receive(event("host_status", 501));
  t.last().receive(event("host_status", 2, {}, "reset"));
  t.last().receive(event("host_status", 2, {}, "reset"));
  assert.deepEqual(t.seen, [501, 2]);
  t.last().serverClose(1006);
  assert.deepEqual(subscribesOf(await reopen(t))[0].since, { epoch: "reset", offset: 2 });
});

test("a server that does not resume: no since, every event delivered, a rebuild after each reconnect", async () => {
  const t = await withSubscription("host_status", null, { offset: null });
  t.client.subscribe("system_alerts", null, () => {});
  t.last().reply(t.last().sent[1], subscribed(t.last().sent[1]));
  t.last().receive({ type: "event", channel: "host_status", data: { n: 1 } });
  t.last().receive({ type: "event", channel: "host_status", data: { n: 1 } });
  t.last().serverClose(1006);
  const ws = await reopen(t);
  const renewals = subscribesOf(ws);
  assert.ok(renewals.every((m) => !("since" in m)), JSON.stringify(renewals));
  for (const renewal of renewals) ws.reply(renewal, subscribed(renewal));
  await t.clock.tick();
  assert.deepEqual(t.seen, [1, 1]);
  assert.deepEqual(t.resumes.map(({ channel, status, snapshot }) => [channel, status, snapshot]),
    [["host_status", "rebuild", true], ["system_alerts", "rebuild", false]]);
});

test("malformed positions are ignored: no since is sent", async () => {
  for (const position of [{ epoch: EPOCH, offset: "12" }, { epoch: EPOCH, offset: -1 }, { epoch: "", offset: 3 },
    { epoch: EPOCH, offset: 1.5 }, "12", null]) {
    const t = await withSubscription("fleet_status", null, { offset: null });
    t.last().receive({ type: "event", channel: "fleet_status", data: { n: 1 }, ...(position && typeof position === "object" ? position : { offset: position }) });
    t.last().serverClose(1006);
    assert.equal("since" in subscribesOf(await reopen(t))[0], false, JSON.stringify(position));
  }
});

test("a first subscription, and one that replaced another, start fresh: no since, no resume report", async () => {
  const t = await withSubscription("host_metrics", { host_id: HOST });
  t.last().receive(event("host_metrics", 11));
  t.client.subscribe("host_metrics", { host_id: HOST, metrics: ["cpu"] }, () => {});
  const replacement = t.last().sent.at(-1);
  assert.equal("since" in replacement, false);
  t.last().reply(replacement, subscribed(replacement, { position: { epoch: EPOCH, offset: 12 } }));
  await t.clock.tick();
  assert.deepEqual(t.resumes, []);
  t.last().serverClose(1006);
  assert.deepEqual(subscribesOf(await reopen(t))[0].since, { epoch: EPOCH, offset: 12 });
});

test("a renewal answered after the connection was replaced is ignored", async () => {
  const t = await withSubscription("system_alerts", null);
  const ws = t.last();
  ws.receive({ type: "status", channel: "system", data: { event: "events_missed" } });
  const [stale] = subscribesOf(ws).slice(1);
  ws.serverClose(1006);
  const next = await reopen(t);
  const [renewal] = subscribesOf(next);
  assert.deepEqual(renewal.since, { epoch: EPOCH, offset: 10 });
  ws.reply(stale, subscribed(stale, { recovered: false })); // on the dead socket: never read
  next.reply(renewal, subscribed(renewal, { recovered: true, position: { epoch: EPOCH, offset: 10 } }));
  await t.clock.tick();
  assert.deepEqual(t.resumes.map((r) => [r.status, r.reason]), [["recovered", "reconnected"]]);
});
