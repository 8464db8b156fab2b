// The browser client (client/wsgate.js, as the gateway serves it) under node, against a
// cluster of gateways behind a spreader. Run by tests/cluster.rs:
// `node cluster.mjs owner-killed <spreader address>`. Prints `session <id>` once two sockets
// on the same instance are open and echoing; the test then kills that instance. Neither may
// hang: the default socket reports "sessionlost" (4410) and goes on in a new session, the
// one made with `reopen: false` closes with 4410. Exits 0 when that holds, 1 with the reason
// on stderr otherwise.
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

const source = await (await fetch(`${base}/.wsgate/client.js`)).text();
vm.runInThisContext(source, { filename: "wsgate.js" });

function openSocket(room, options) {
  const socket = new globalThis.WsgateSocket(`${base}/chat?room=${room}`, [], {
    transport: "polling",
    backoffBase: 50,
    backoffMax: 200,
    ...options,
  });
  const state = { socket, received: [], closed: null, lost: null };
  socket.onmessage = (event) => state.received.push(event.data);
  socket.onclose = (event) => (state.closed = { code: event.code, reason: event.reason });
  socket.addEventListener("sessionlost", (event) => (state.lost = event.detail));
  return state;
}

const instanceOf = (state) => state.socket._sid.split("~")[0];

if (scenario === "owner-killed") {
  const first = openSocket("k");
  await until("the session to open", () => first.socket.readyState === 1, 10000);
  first.socket.send("a");
  await until("the echo of a", () => first.received.includes("a"), 5000);
  // A second socket, closing on a lost session, on the same instance (the spreader picks one
  // at random for each new connection).
  let closing;
  for (let attempt = 0; ; attempt++) {
    if (attempt === 30) fail("no session landed on the first one's instance");
    const candidate = openSocket("k", { reopen: false });
    await until("the second session to open", () => candidate.socket.readyState === 1, 10000);
    if (instanceOf(candidate) === instanceOf(first)) {
      closing = candidate;
      break;
    }
    candidate.socket.onclose = null;
    candidate.socket.close();
  }
  const lostSid = first.socket._sid;
  process.stdout.write(`session ${lostSid}\n`);
  // The owner is killed now; the next poll or send finds the sessions gone.
  await until("the closing socket to report its session gone", () => closing.closed !== null, 15000);
  if (closing.closed.code !== 4410) fail(`closed with ${closing.closed.code} ${closing.closed.reason}`);
  await until("the default socket to report its session lost", () => first.lost !== null, 15000);
  if (first.lost.code !== 4410) fail(`session lost with ${first.lost.code}`);
  if (first.closed !== null) fail(`the reopening socket closed: ${first.closed.code}`);
  await until("a new session", () => first.socket._sid !== null && first.socket._sid !== lostSid, 5000);
  first.socket.send("b");
  await until("the echo of b in the new session", () => first.received.includes("b"), 5000);
  if (first.socket.readyState !== 1) fail("the reopened socket is not open");
  first.socket.onclose = null;
  first.socket.close();
} else {
  fail("unknown scenario");
}
process.exit(0);
