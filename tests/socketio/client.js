// Drives one scenario of the Socket.IO app (server.js) through the gateway, for
// tests/socketio.rs, and prints exactly one JSON line with what every client observed. The
// Rust test makes the assertions; this script only fails on its own when a step cannot
// complete (connect, ack, upgrade), and then still prints a JSON line with `ok: false`.
//
// Usage: node client.js URL SCENARIO ROOM_A ROOM_B
//
// Scenarios (room A gets three clients a1..a3, room B two, b1..b2, unless noted):
//   polling    transports ["polling"]
//   websocket  transports ["websocket"]
//   upgrade    default transports: polling first, then the upgrade to WebSocket, awaited
//              before anything is sent
//   longpoll   transports ["polling"], a1 and a2 in A, b1 in B: a1 asks for a `later` event
//              in 2 s; the GET that delivers it has been held by the server that long
//
// Every wait is bounded, and the whole run is cut at 30 s, so the script never hangs.
"use strict";

const { io } = require("socket.io-client");

const [url, scenario, roomA, roomB] = process.argv.slice(2);
const STEP_TIMEOUT_MS = 10000;
const ACK_TIMEOUT_MS = 5000;
const SETTLE_MS = 500;
const LATER_DELAY_MS = 2000;

const SCENARIOS = {
  polling: { transports: ["polling"], rooms: { a: 3, b: 2 } },
  websocket: { transports: ["websocket"], rooms: { a: 3, b: 2 } },
  upgrade: { transports: undefined, awaitUpgrade: true, rooms: { a: 3, b: 2 } },
  longpoll: { transports: ["polling"], rooms: { a: 2, b: 1 }, later: true },
};

const started = performance.now();
const now = () => Math.round(performance.now() - started);
const records = [];
const sockets = [];

function finish(result, code) {
  for (const socket of sockets) socket.disconnect();
  process.stdout.write(JSON.stringify({ scenario, ...result, clients: records }) + "\n", () =>
    process.exit(code),
  );
}

setTimeout(() => finish({ ok: false, error: "client.js: the scenario took more than 30 s" }, 2), 30000);

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Opens one client; resolves once it is connected (and upgraded, when asked). */
function open(name, room, spec) {
  const rec = {
    name,
    room,
    id: null,
    transportAtConnect: null,
    transport: null,
    upgraded: false,
    transportAfterUpgrade: null,
    whoami: null,
    ack: null,
    received: [],
    later: [],
    disconnects: [],
    errors: [],
  };
  records.push(rec);
  const options = { query: { room }, forceNew: true, reconnection: false, timeout: 5000 };
  if (spec.transports) options.transports = spec.transports;
  const socket = io(url, options);
  sockets.push(socket);
  // The polling GET in flight, and the last one that completed. Socket.IO dispatches events a
  // tick after their GET completes, by which time the next GET has started, hence `lastPoll`.
  let pollStart = null;
  let lastPoll = null;

  let upgraded;
  const upgradeSeen = new Promise((resolve) => (upgraded = resolve));
  socket.io.on("open", () => {
    const engine = socket.io.engine;
    engine.transport.on("poll", () => (pollStart = performance.now()));
    engine.transport.on("pollComplete", () => {
      lastPoll = { ms: Math.round(performance.now() - pollStart), endedAtMs: now() };
    });
    engine.on("upgrade", (transport) => {
      rec.upgraded = true;
      // The engine switches transports before it emits `upgrade`.
      rec.transportAfterUpgrade = socket.io.engine.transport.name;
      rec.upgradeTransport = transport.name;
      upgraded();
    });
    engine.on("upgradeError", (error) => rec.errors.push(`upgradeError: ${error.message}`));
  });
  socket.on("chat", (message) => rec.received.push(message));
  socket.on("later", (message) => {
    // heldMs: how long the GET that delivered this event was held (null without polling).
    rec.later.push({ ...message, atMs: now(), heldMs: lastPoll === null ? null : lastPoll.ms });
  });
  socket.on("disconnect", (reason) => rec.disconnects.push(reason));

  const connected = new Promise((resolve, reject) => {
    socket.once("connect", () => {
      rec.id = socket.id;
      rec.transportAtConnect = socket.io.engine.transport.name;
      resolve();
    });
    socket.once("connect_error", (error) => {
      rec.errors.push(`connect_error: ${error.message}`);
      reject(new Error(`${name}: connect_error: ${error.message}`));
    });
  });
  const ready = spec.awaitUpgrade ? connected.then(() => upgradeSeen) : connected;
  return { socket, rec, ready: withTimeout(ready, STEP_TIMEOUT_MS, `${name} connect`) };
}

/** Resolves when `done()` holds, checking every 20 ms, or rejects after `ms`. */
function until(done, ms, what) {
  return withTimeout(
    new Promise((resolve) => {
      const check = () => (done() ? resolve() : setTimeout(check, 20));
      check();
    }),
    ms,
    what,
  );
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const spec = SCENARIOS[scenario];
  if (!url || !spec || !roomA || !roomB) {
    throw new Error(`usage: node client.js URL {${Object.keys(SCENARIOS).join("|")}} ROOM_A ROOM_B`);
  }
  const clients = [];
  for (const [label, room] of [["a", roomA], ["b", roomB]]) {
    for (let n = 1; n <= spec.rooms[label]; n++) clients.push(open(`${label}${n}`, room, spec));
  }
  await Promise.all(clients.map((c) => c.ready));

  // Which server, and which transport as the server sees it, each client has reached.
  await Promise.all(
    clients.map(async (c) => {
      c.rec.whoami = await c.socket.timeout(ACK_TIMEOUT_MS).emitWithAck("whoami");
    }),
  );

  if (spec.later) {
    const [a1] = clients;
    a1.rec.ack = await a1.socket
      .timeout(ACK_TIMEOUT_MS)
      .emitWithAck("later", { delayMs: LATER_DELAY_MS });
    a1.rec.laterRequestedAtMs = now();
    const inA = clients.filter((c) => c.rec.room === roomA);
    await until(
      () => inA.every((c) => c.rec.later.length > 0),
      LATER_DELAY_MS + STEP_TIMEOUT_MS,
      "the delayed `later` event",
    );
  } else {
    await Promise.all(
      clients.map(async (c) => {
        c.rec.ack = await c.socket.timeout(ACK_TIMEOUT_MS).emitWithAck("chat", `hello from ${c.rec.name}`);
      }),
    );
    const members = (room) => clients.filter((c) => c.rec.room === room).length;
    await until(
      () => clients.every((c) => c.rec.received.length >= members(c.rec.room)),
      STEP_TIMEOUT_MS,
      "chat delivery",
    );
  }
  // Anything delivered to the wrong client would arrive now.
  await sleep(SETTLE_MS);

  for (const c of clients) {
    c.rec.transport = c.socket.io.engine ? c.socket.io.engine.transport.name : null;
    // Still the session it opened with: no disconnect, no silent reconnection.
    c.rec.connectedAtEnd = c.socket.connected && c.socket.id === c.rec.id;
  }
  return { ok: true };
}

main().then(
  (result) => finish(result, 0),
  (error) => finish({ ok: false, error: String(error && error.stack ? error.stack : error) }, 1),
);
