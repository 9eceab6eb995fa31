// Against a running server; skipped unless configured. With Node 20 (no global WebSocket):
//
//   SYSMANAGE_TEST_SERVER=http://127.0.0.1:8000 SYSMANAGE_TEST_USERNAME=admin \
//   SYSMANAGE_TEST_PASSWORD_FILE=var/admin-password \
//   NODE_OPTIONS=--experimental-websocket node --test tests/js/
//
// The user needs permission to run commands (a superuser has it). Started with a short
// JWT_ACCESS_TTL_SECONDS (e.g. 75), the server also lets this test watch a token refresh.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { decodeJwtExpiry, SysManageClient } from "../../static/js/sysmanage-client.js";

const base = process.env.SYSMANAGE_TEST_SERVER;
const username = process.env.SYSMANAGE_TEST_USERNAME;
const passwordFile = process.env.SYSMANAGE_TEST_PASSWORD_FILE;
const password = process.env.SYSMANAGE_TEST_PASSWORD ?? (passwordFile && readFileSync(passwordFile, "utf8").trim());
const skip = !base || !username || !password ? "set SYSMANAGE_TEST_SERVER, _USERNAME and _PASSWORD(_FILE)"
  : typeof WebSocket !== "function" ? "needs a global WebSocket (NODE_OPTIONS=--experimental-websocket)" : false;

/** getToken for a program: logs in once, then rotates the refresh token. */
function tokenSource() {
  let refresh = null;
  const post = async (path, body) => {
    const response = await fetch(new URL(path, base), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    return response.json();
  };
  const getToken = async () => {
    getToken.calls++;
    const tokens = refresh ? await post("/api/token/refresh/", { refresh }) : await post("/api/token/", { username, password });
    refresh = tokens.refresh;
    return tokens.access;
  };
  getToken.calls = 0;
  return getToken;
}

const until = async (check, ms = 5000) => {
  for (const end = Date.now() + ms; !check(); await new Promise((r) => setTimeout(r, 20))) {
    if (Date.now() > end) throw new Error("timed out waiting");
  }
};

test("a live server: subscribe, status snapshot, ping, refused filters, failed command", { skip }, async () => {
  const url = base.replace(/^http/, "ws") + "/ws";
  const client = new SysManageClient({ url, getToken: tokenSource() });
  const states = [];
  const errors = [];
  client.onStateChange((state) => states.push(state));
  client.onError((error) => errors.push(error));
  const seen = [];
  const fleet = client.subscribe("fleet_status", null, (data, message) => seen.push(message.type));
  client.connect();
  try {
    const response = await fleet.ready;
    assert.equal(response.data.status, "subscribed");
    await until(() => seen.includes("status"));
    assert.equal((await client.request({ type: "ping" })).type, "pong");

    const packages = client.subscribe("package_operations", {}, () => {});
    await assert.rejects(packages.ready, { code: "INVALID_FILTERS" });
    assert.equal(errors.at(-1).code, "INVALID_FILTERS");

    await assert.rejects(
      client.command("command_execution", { host_id: crypto.randomUUID(), command: "uptime", timeout: 5 }),
      (err) => err.code === "COMMAND_FAILED" && err.server && err.data.execution_id === null);
    assert.deepEqual(states, ["connecting", "open"]);
  } finally {
    client.close();
  }
});

test("a live server: the token is handed over in band before it expires, without going offline", { skip }, async (t) => {
  const getToken = tokenSource();
  const lifetime = decodeJwtExpiry(await getToken()) - Date.now();
  if (lifetime > 120_000) return t.skip("the server's access tokens live over 2 minutes");
  const url = base.replace(/^http/, "ws") + "/ws";
  const client = new SysManageClient({ url, getToken, refreshBefore: 20_000 });
  const states = [];
  client.onStateChange((state) => states.push(state));
  const seen = [];
  const resumes = [];
  client.subscribe("fleet_status", null, (data, message) => seen.push(message.type));
  const connectedAt = Date.now();
  client.connect();
  try {
    await until(() => seen.length === 1);
    await until(() => getToken.calls === 3, lifetime + 10_000); // the refresh
    await until(() => Date.now() > connectedAt + lifetime + 2_000, lifetime + 10_000);
    // past the first token's expiry: a command is taken (not TOKEN_EXPIRED, as it would
    // be while the server waits for a refresh), on the same connection
    await assert.rejects(
      client.command("command_execution", { host_id: crypto.randomUUID(), command: "uptime", timeout: 5 }),
      (err) => err.code === "COMMAND_FAILED");
    assert.deepEqual(seen, ["status"], "the subscription carried on, not renewed");
    assert.deepEqual(states, ["connecting", "open"]);
    assert.equal((await client.request({ type: "ping" })).type, "pong");
  } finally {
    client.close();
  }
});
