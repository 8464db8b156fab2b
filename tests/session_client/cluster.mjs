// The browser client (client/wsgate.js, as the gateway serves it) under node, against a
// cluster of gateways behind a spreader. Run by tests/cluster.rs:
// `node cluster.mjs owner-killed <spreader address>`. Prints `session <id>` once its session
// is open and echoing; the test then kills the instance owning it. The client must report
// the session gone (close 4410) rather than hang, and a new session must work. Exits 0 when
// that holds, 1 with the reason on stderr otherwise.
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

function openSocket(room) {
  const socket = new globalThis.WsgateSocket(`${base}/chat?room=${room}`, [], {
    transport: "polling",
    backoffBase: 50,
    backoffMax: 200,
  });
  const state = { socket, received: [], closed: null };
  socket.onmessage = (event) => state.received.push(event.data);
  socket.onclose = (event) => (state.closed = { code: event.code, reason: event.reason });
  return state;
}

if (scenario === "owner-killed") {
  const first = openSocket("k");
  await until("the session to open", () => first.socket.readyState === 1, 5000);
  first.socket.send("a");
  await until("the echo of a", () => first.received.includes("a"), 5000);
  process.stdout.write(`session ${first.socket._sid}\n`);
  // The owner is killed now; the next poll or send finds the session gone.
  await until("the session to be reported gone", () => first.closed !== null, 15000);
  if (first.closed.code !== 4410) fail(`closed with ${first.closed.code} ${first.closed.reason}`);
  const second = openSocket("k");
  await until("a new session to open", () => second.socket.readyState === 1, 5000);
  second.socket.send("b");
  await until("the echo of b", () => second.received.includes("b"), 5000);
  if (second.closed !== null) fail(`the new session closed: ${second.closed.code}`);
  second.socket.onclose = null;
  second.socket.close();
} else {
  fail("unknown scenario");
}
process.exit(0);
