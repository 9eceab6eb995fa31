import assert from "node:assert/strict";
import { test } from "node:test";
import { backoffDelay, decodeJwtExpiry, isEnvelope, websocketUrl } from "../../static/js/sysmanage-client.js";
import { makeJwt } from "./fakes.js";

test("decodeJwtExpiry reads exp (seconds) as epoch milliseconds", () => {
  assert.equal(decodeJwtExpiry(makeJwt({ exp: 1_700_000_900, user_id: "ü-ser" })), 1_700_000_900_000);
});

test("decodeJwtExpiry returns null for tokens without a usable exp", () => {
  assert.equal(decodeJwtExpiry(makeJwt({ sub: "x" })), null);
  assert.equal(decodeJwtExpiry(makeJwt({ exp: "soon" })), null);
  assert.equal(decodeJwtExpiry("not-a-jwt"), null);
  assert.equal(decodeJwtExpiry("a.%%%.c"), null);
  assert.equal(decodeJwtExpiry(null), null);
  assert.equal(decodeJwtExpiry(undefined), null);
});

test("websocketUrl follows the page's scheme and host", () => {
  assert.equal(websocketUrl({ protocol: "http:", host: "fleet.example:8000" }), "ws://fleet.example:8000/ws");
  assert.equal(websocketUrl({ protocol: "https:", host: "fleet.example" }), "wss://fleet.example/ws");
  assert.throws(() => websocketUrl(undefined));
});

test("backoffDelay: full jitter below an exponential cap bounded by maxDelay", () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(30000, 1000 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, 1000, 30000, () => 0), 0);
    const high = backoffDelay(attempt, 1000, 30000, () => 0.999999);
    assert.ok(high < cap && high >= cap - 1, `attempt ${attempt}: ${high} vs cap ${cap}`);
  }
  assert.equal(backoffDelay(3, 1000, 30000, () => 0.5), 4000);
  assert.equal(backoffDelay(1000, 1000, 30000, () => 0.5), 15000);
  for (let i = 0; i < 200; i++) {
    const delay = backoffDelay(4, 1000, 30000);
    assert.ok(delay >= 0 && delay < 16000);
  }
});

test("isEnvelope accepts server messages and rejects malformed ones", () => {
  assert.ok(isEnvelope({ type: "event", channel: "host_status", data: {} }));
  assert.ok(isEnvelope({ type: "pong", channel: "system", data: {}, id: 7 }));
  for (const bad of [null, 3, "x", [], { type: "event", channel: "c" }, { type: "event", data: {} },
    { type: 1, channel: "c", data: {} }, { type: "event", channel: "c", data: [] },
    { type: "event", channel: "c", data: null }, { type: "event", channel: "c", data: {}, id: {} }]) {
    assert.equal(isEnvelope(bad), false, JSON.stringify(bad));
  }
});
