// One instance of a Socket.IO v4 chat app, for tests/socketio.rs.
//
// Usage: node server.js PORT NAME
//
// Deliberately without an adapter (no Redis, no shared state between instances): a room only
// works if every client of the room, and every request of each client, reaches the same
// instance. That is what wsgate's sticky routing has to provide.
//
// - A client joins the room named by its handshake query (`?room=...`).
// - `whoami` (ack): which server and which transport the server sees for this client.
// - `chat` (text, ack): broadcast to the room as {text, room, server}; the ack names the
//   server that handled it.
// - `later` ({delayMs}, ack): acknowledged at once; after delayMs the room gets a `later`
//   event. With polling, the client's next GET is held by the server during the delay.
//
// Prints "ready" on stdout once listening on 127.0.0.1:PORT. Exits when stdin closes, so an
// instance never outlives the test that started it.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const [port, name] = process.argv.slice(2);
if (!port || !name) {
  console.error("usage: node server.js PORT NAME");
  process.exit(64);
}

const httpServer = http.createServer((req, res) => {
  // Anything that is not Socket.IO: a plain page naming this instance.
  res.writeHead(200, { "content-type": "text/plain" });
  res.end(`server ${name}\n`);
});

const io = new Server(httpServer, {
  // The defaults, written out: a polling GET is held up to pingInterval when there is nothing
  // to send.
  pingInterval: 25000,
  pingTimeout: 20000,
});

io.on("connection", (socket) => {
  const room = String(socket.handshake.query.room ?? "");
  if (!room) {
    socket.disconnect(true);
    return;
  }
  socket.join(room);

  socket.on("whoami", (ack) => {
    if (typeof ack !== "function") return;
    ack({ server: name, room, transport: socket.conn.transport.name });
  });

  socket.on("chat", (text, ack) => {
    io.to(room).emit("chat", { text: String(text), room, server: name });
    if (typeof ack === "function") ack({ server: name, room });
  });

  socket.on("later", (options, ack) => {
    const delayMs = Math.max(0, Math.min(Number(options?.delayMs) || 0, 10000));
    if (typeof ack === "function") ack({ server: name, room, delayMs });
    setTimeout(() => io.to(room).emit("later", { server: name, room, delayMs }), delayMs);
  });
});

httpServer.on("error", (error) => {
  console.error(`server ${name}: ${error.message}`);
  process.exit(1);
});

httpServer.listen(Number(port), "127.0.0.1", () => {
  process.stdout.write("ready\n");
});

// The test holds our stdin open; when it goes away (test over, or test process killed), so do we.
process.stdin.on("end", () => process.exit(0));
process.stdin.on("error", () => process.exit(0));
process.stdin.resume();
