// Drives the browser client (client/wsgate.js, as the gateway serves it) under node, over the
// long-polling transport, against a real gateway and echo backend. Run by
// tests/hostile_sessions.rs: `node resume.mjs <scenario> <gateway address>`; exits 0 when the
// scenario holds, 1 with the reason on stderr otherwise. No npm packages: node >= 18 has fetch,
// EventTarget and friends.
import vm from "node:vm";

const [scenario, address] = process.argv.slice(2);
const base = `http://${address}`;

function fail(why) {
  console.error(`${scenario}: ${why}`);
  process.exit(1);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(what, predicate, ms) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

// The network, as the client sees it: every fetch is counted, and while offline each one
// fails at once the way a browser's does with no connection.
const realFetch = globalThis.fetch;
// With `losesSessions`, every poll and send is answered 410 as by a gateway that lost the
// session (its owner instance unreachable, say), while opens still reach the real gateway.
const network = { offline: false, attempts: [], losesSessions: false, opens: [] };
globalThis.fetch = (url, init) => {
  network.attempts.push(Date.now());
  if (network.offline) return Promise.reject(new TypeError("Failed to fetch"));
  const op = new URL(url).searchParams.get("wsgate");
  if (op === "open") network.opens.push(Date.now());
  if (network.losesSessions && (op === "poll" || op === "send")) {
    const gone = JSON.stringify({ error: "session gone" });
    return Promise.resolve(new Response(gone, { status: 410, headers: { "content-type": "application/json" } }));
  }
  return realFetch(url, init);
};

const source = await (await realFetch(`${base}/.wsgate/client.js`)).text();
vm.runInThisContext(source, { filename: "wsgate.js" });

async function openSocket(options) {
  const socket = new globalThis.WsgateSocket(`${base}/`, [], Object.assign({ transport: "polling" }, options));
  const received = [];
  socket.onmessage = (event) => received.push(event.data);
  socket.onclose = (event) => fail(`closed: ${event.code} ${event.reason}`);
  await until("the session to open", () => socket.readyState === 1, 3000);
  return { socket, received };
}

if (scenario === "send-after-reconnect") {
  // Messages sent while the previous transport's send is in flight and the session resumes
  // all reach the backend (and come back from the echo), in order.
  const { socket, received } = await openSocket();
  socket.send("a");
  socket.reconnect();
  socket.send("b");
  socket.send("c");
  await until("the echo of a, b and c", () => received.length >= 3, 3000);
  socket.send("d");
  await until("the echo of d", () => received.length >= 4, 3000);
  if (received.join() !== "a,b,c,d") fail(`received ${received.join()}`);
} else if (scenario === "offline-backoff") {
  // Offline, the client retries with exponential backoff (capped), not every few hundred
  // milliseconds; back online it resumes, and the backoff starts over.
  const { socket, received } = await openSocket({ backoffBase: 250, backoffMax: 1000 });
  network.offline = true;
  network.attempts = [];
  socket.reconnect();
  await sleep(2800);
  const offlineTries = network.attempts.length;
  // 125-250, 250-500, then 500-1000 ms apart: at most 7 in 2.8 s (the same network
  // answered 13 to 29 times when every resume reset the backoff).
  if (offlineTries < 3 || offlineTries > 7) fail(`${offlineTries} tries in 2.8 s offline`);
  const gaps = network.attempts.slice(1).map((t, i) => t - network.attempts[i]);
  if (gaps.length >= 3 && !(gaps[2] > gaps[0])) fail(`the delays do not grow: ${gaps.join(", ")} ms`);
  network.offline = false;
  socket.send("back");
  await until("the echo after coming back", () => received.includes("back"), 3000);
  // A success resets the backoff: the next outage is retried within the first delay.
  network.offline = true;
  network.attempts = [];
  socket.reconnect();
  await sleep(400);
  if (network.attempts.length < 2) fail(`after a success, ${network.attempts.length} tries in the first 400 ms offline`);
  network.offline = false;
  socket.onclose = null;
} else if (scenario === "lost-sessions-backoff") {
  // Every new session is lost at once: the client opens the next one with the same growing
  // backoff as when offline, not after its first delay each time; once a session works, the
  // backoff starts over.
  const { socket, received } = await openSocket({ backoffBase: 250, backoffMax: 1000 });
  let lost = 0;
  socket.addEventListener("sessionlost", () => lost++);
  network.losesSessions = true;
  network.opens = [];
  socket.reconnect();
  await sleep(2800);
  const opens = network.opens.length;
  // 125-250, 250-500, then 500-1000 ms apart: at most 7 in 2.8 s (more when an open
  // reset the backoff: 14 were seen).
  if (opens < 3 || opens > 7) fail(`${opens} sessions opened in 2.8 s of lost sessions`);
  if (lost < opens) fail(`${lost} "sessionlost" events for ${opens} sessions opened`);
  network.losesSessions = false;
  socket.send("back");
  await until("the echo in a session that works", () => received.includes("back"), 3000);
  network.losesSessions = true;
  network.opens = [];
  socket.reconnect();
  await sleep(400);
  if (network.opens.length < 1) fail("after a working session, no new session within 400 ms");
  network.losesSessions = false;
  socket.onclose = null;
} else {
  fail("unknown scenario");
}
process.exit(0);
