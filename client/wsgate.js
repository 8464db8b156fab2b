// wsgate session client: a WebSocket-like object that survives dropped connections.
//
// Served by every wsgate listener at /.wsgate/client.js. No dependencies. Speaks the session
// protocol of docs/sessions.md: it tries a session WebSocket first and falls back to HTTP
// long-polling by itself (or is forced to one transport; "sse" receives over Server-Sent
// Events and sends over POST), reconnects with exponential backoff
// and jitter, and resumes its session, so the application receives every backend message once
// and in order, and every message it sends reaches the backend once and in order.
//
//   const socket = new WsgateSocket("wss://chat.example.com/rooms/lobby", ["chat.v1"],
//                                   { transport: "auto" });   // or "websocket", "polling", "sse"
//   socket.onmessage = (e) => console.log(e.data);             // string or ArrayBuffer
//   socket.send("hello");
//
// Events: open (once), message, close (once: {code, reason, wasClean}), error, and, for
// status displays, "transport" (detail: "websocket" | "polling") and "reconnecting".
//
// A session the gateway no longer has (410 / close 4410: it expired while the client was
// away, or the gateway instance holding it is gone) is replaced by a new one on its own:
// "sessionlost" (detail: {code, reason, unconfirmed}) is emitted, the socket stays open and
// reconnects to a fresh session. Messages from the backend after the last one received are
// lost with the old session, and `unconfirmed` lists those sent but never acknowledged (they
// may or may not have reached the backend; the application decides whether to send them
// again). With `{ reopen: false }` the socket closes with 4410 instead, like a WebSocket.
//
// On a route with `auth.jwt`, pass the token: `{ token: "eyJ..." }`, or a function returning
// one (or a promise of one), called each time a session is opened, so a fresh token is used
// after the old session ended. It travels as the query parameter `tokenParam`
// ("access_token"), or, with `tokenTransport: "subprotocol"`, as the WebSocket subprotocol
// entry `tokenPrefix + token` ("bearer."; offer a real subprotocol beside it: a browser fails a
// handshake that offered protocols and got none back). Long-polling always uses the query
// parameter. The gateway removes it before the backend sees the request, binds the session to
// the token's subject and ends the session (close code 1008 by default) when the token expires.
(function (global) {
  "use strict";

  const CONNECTING = 0, OPEN = 1, CLOSING = 2, CLOSED = 3;
  const TAG_DATA = 0x64, TAG_CONTROL = 0x63; // "d", "c"
  const CLOSE_GONE = 4410, CLOSE_SUPERSEDED = 4409, CLOSE_FORBIDDEN = 4403, CLOSE_DETACH = 4100;
  const ACK_EVERY_MS = 500;

  function withQuery(url, params) {
    const u = new URL(url, global.location ? global.location.href : undefined);
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) u.searchParams.set(k, String(v));
    return u;
  }

  function httpUrl(url) {
    const u = new URL(url, global.location ? global.location.href : undefined);
    if (u.protocol === "ws:") u.protocol = "http:";
    if (u.protocol === "wss:") u.protocol = "https:";
    return u.toString();
  }

  function wsUrl(url) {
    const u = new URL(url, global.location ? global.location.href : undefined);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    return u.toString();
  }

  function toBase64(buffer) {
    const bytes = new Uint8Array(buffer);
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  function fromBase64(text) {
    const s = atob(text);
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return bytes.buffer;
  }

  class WsgateSocket extends EventTarget {
    constructor(url, protocols, options) {
      super();
      this.url = url;
      this._protocols = protocols === undefined ? [] : Array.isArray(protocols) ? protocols : [protocols];
      const o = options || {};
      this._mode = o.transport || "auto";
      this._token = o.token;
      this._tokenTransport = o.tokenTransport || "query";
      this._tokenParam = o.tokenParam || "access_token";
      this._tokenPrefix = o.tokenPrefix || "bearer.";
      this._reopen = o.reopen !== false;
      this._backoff = { base: o.backoffBase || 250, max: o.backoffMax || 10000, attempt: 0 };
      this.readyState = CONNECTING;
      this.protocol = "";
      this.binaryType = "arraybuffer";
      this.transport = null;           // "websocket" | "polling" once connected
      this._sid = null;
      this._received = 0;              // highest backend event number delivered to the app
      this._nextSeq = 1;               // number of the next message the app sends
      this._outbox = [];               // [{seq, data}] not yet acknowledged by the gateway
      this._generation = 0;            // bumps to abandon a transport
      this._wsFailedBeforeOpen = false;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      setTimeout(() => this._connect(), 0);
    }

    get bufferedAmount() { return this._outbox.reduce((n, m) => n + (m.data.length || m.data.byteLength || 0), 0); }

    send(data) {
      if (this.readyState === CONNECTING) throw new DOMException("still connecting", "InvalidStateError");
      if (this.readyState !== OPEN) return;
      let payload;
      if (typeof data === "string") payload = data;
      else if (data instanceof ArrayBuffer) payload = data.slice(0);
      else if (ArrayBuffer.isView(data)) payload = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
      else throw new TypeError("send() takes a string, an ArrayBuffer or a typed array");
      const message = { seq: this._nextSeq++, data: payload };
      this._outbox.push(message);
      if (this.transport === "websocket") this._wsSend(message);
      else if (this.transport) this._pumpSends();
    }

    close(code, reason) {
      if (this.readyState >= CLOSING) return;
      code = code === undefined ? 1000 : code;
      if (code !== 1000 && (code < 3000 || code > 4999 || code === CLOSE_DETACH)) {
        throw new DOMException("close code must be 1000 or 3000-4999", "InvalidAccessError");
      }
      reason = reason || "";
      const wasOpen = this.readyState === OPEN;
      this.readyState = CLOSING;
      if (!wasOpen || !this._sid) return this._finish(code, reason, true);
      if (this.transport === "websocket" && this._ws) {
        this._closing = { code, reason };
        this._ws.close(code, reason);
      } else {
        fetch(this._sessionUrl("close"), { method: "POST", body: JSON.stringify({ code, reason }), headers: { "content-type": "text/plain" } })
          .catch(() => {})
          .finally(() => this._finish(code, reason, true));
      }
    }

    // Drops the current connection and resumes the session on a new one after `delayMs`
    // (default 0), as after a network change. The backend notices nothing; what it sends
    // meanwhile arrives after the resume.
    reconnect(delayMs) {
      if (this.readyState !== OPEN) return;
      this._abandon();
      this._emit("reconnecting");
      setTimeout(() => this._connect(), delayMs || 0);
    }

    // ----- connection management -----

    _connect() {
      if (this.readyState >= CLOSING) return;
      const useWs = this._mode === "websocket" || (this._mode === "auto" && !this._wsFailedBeforeOpen && typeof WebSocket !== "undefined");
      if (useWs) this._connectWs(); else this._connectPolling(this._mode === "sse");
    }

    _retry() {
      if (this.readyState >= CLOSING) return;
      this._abandon();
      this._emit("reconnecting");
      const b = this._backoff;
      const ceiling = Math.min(b.max, b.base * Math.pow(2, b.attempt++));
      // "Full jitter": a fleet of clients dropped together does not come back together.
      const delay = ceiling / 2 + Math.random() * ceiling / 2;
      setTimeout(() => this._connect(), delay);
    }

    _abandon() {
      this._generation++;
      clearInterval(this._ackTimer);
      if (this._ws) {
        const ws = this._ws;
        this._ws = null;
        try { if (ws.readyState <= 1) ws.close(CLOSE_DETACH, "reconnecting"); } catch (e) { /* already gone */ }
      }
      if (this._events) { this._events.close(); this._events = null; }
      if (this._polls) { for (const c of this._polls) c.abort(); }
      this._polls = new Set();
    }

    // An opened session resets no backoff: one lost again at once (its owner unreachable, say)
    // would otherwise be reopened every few hundred milliseconds, by every client at once.
    // What resets it is the session working: a WebSocket attached to it, a poll, send or event
    // stream answered.
    _established(opened, transport) {
      this._sid = opened.session;
      this.transport = transport;
      this._dropAcked(opened.received);
      this._emit("transport", transport);
      if (this.readyState === CONNECTING) {
        this.readyState = OPEN;
        this.protocol = opened.protocol || "";
        this._emit("open");
      }
    }

    _dropAcked(received) {
      while (this._outbox.length && this._outbox[0].seq <= received) this._outbox.shift();
    }

    _deliver(seq, data) {
      if (seq <= this._received) return; // seen already (a resent answer)
      this._received = seq;
      this._emit("message", data);
    }

    _sessionGone(code, reason) {
      this._abandon();
      if (code === CLOSE_GONE && this._reopen && this.readyState === OPEN) {
        const unconfirmed = this._outbox.map((m) => m.data);
        this._sid = null;
        this._received = 0;
        this._nextSeq = 1;
        this._outbox = [];
        this._emit("sessionlost", { code, reason, unconfirmed });
        return this._retry();
      }
      this._finish(code, reason, false);
    }

    _finish(code, reason, wasClean) {
      if (this.readyState === CLOSED) return;
      this._abandon();
      this.readyState = CLOSED;
      this._emit("close", { code, reason, wasClean });
    }

    _emit(type, detail) {
      let event;
      if (type === "message") event = new MessageEvent("message", { data: detail });
      else if (type === "close") event = Object.assign(new Event("close"), detail);
      else if (type === "transport" || type === "reconnecting" || type === "sessionlost") event = new CustomEvent(type, { detail });
      else event = new Event(type);
      const handler = this["on" + type];
      if (typeof handler === "function") handler.call(this, event);
      this.dispatchEvent(event);
    }

    // The token for a new session, or null (no token configured, or the function gave none).
    async _openToken() {
      if (this._sid) return null;
      const token = typeof this._token === "function" ? await this._token() : this._token;
      return token ? String(token) : null;
    }

    _sessionUrl(op, extra) {
      return withQuery(httpUrl(this.url), Object.assign({ wsgate: op, wsgate_sid: this._sid }, extra || {})).toString();
    }

    // ----- WebSocket transport -----

    async _connectWs() {
      const generation = ++this._generation;
      const params = { wsgate: "socket" };
      if (this._sid) { params.wsgate_sid = this._sid; params.wsgate_ack = this._received; }
      let protocols = this._protocols;
      let token;
      try { token = await this._openToken(); }
      catch (e) { if (generation === this._generation) { this._emit("error"); this._retry(); } return; }
      if (generation !== this._generation) return;
      if (token && this._tokenTransport === "subprotocol") protocols = protocols.concat([this._tokenPrefix + token]);
      else if (token) params[this._tokenParam] = token;
      let ws;
      try { ws = new WebSocket(withQuery(wsUrl(this.url), params).toString(), protocols); }
      catch (e) { this._wsFailedBeforeOpen = true; return this._retry(); }
      ws.binaryType = "arraybuffer";
      this._ws = ws;
      let opened = false;
      let acked = this._received;
      ws.onmessage = (m) => {
        if (generation !== this._generation) return;
        if (typeof m.data === "string") {
          const tag = m.data.charCodeAt(0);
          if (tag === TAG_DATA) this._deliver(this._wsNext++, m.data.slice(1));
          else if (tag === TAG_CONTROL) {
            const control = JSON.parse(m.data.slice(1));
            if (control.type === "open") {
              opened = true;
              this._wsWorked = true;
              this._wsNext = this._received + 1;
              this._backoff.attempt = 0;
              this._established(control, "websocket");
              for (const message of this._outbox) this._wsSend(message);
              this._ackTimer = setInterval(() => {
                if (this._received !== acked && ws.readyState === 1) {
                  acked = this._received;
                  ws.send("c" + JSON.stringify({ type: "ack", received: acked }));
                }
              }, ACK_EVERY_MS);
            } else if (control.type === "ack") this._dropAcked(control.received);
          }
        } else {
          const bytes = new Uint8Array(m.data);
          if (bytes[0] === TAG_DATA) this._deliver(this._wsNext++, m.data.slice(1));
        }
      };
      ws.onerror = () => { if (generation === this._generation) this._emit("error"); };
      ws.onclose = (e) => {
        if (generation !== this._generation) return;
        this._ws = null;
        if (this._closing) return this._finish(this._closing.code, this._closing.reason, true);
        if (e.code === CLOSE_GONE || e.code === CLOSE_FORBIDDEN) return this._sessionGone(e.code, e.reason || "session gone");
        if (e.code === CLOSE_SUPERSEDED) return; // another connection of this session took over
        if (opened && e.wasClean && e.code !== 1006 && e.code !== 1001) {
          // The backend's close, after every message before it.
          return this._finish(e.code, e.reason, true);
        }
        // A WebSocket that never opened, on a client where none ever did, is blocked on the way
        // (a proxy stripping Upgrade): fall back to long-polling for good. One that worked
        // before only dropped: try it again.
        if (!opened && !this._wsWorked && this._mode === "auto") this._wsFailedBeforeOpen = true;
        this._retry();
      };
    }

    _wsSend(message) {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1 || this.transport !== "websocket") return;
      if (typeof message.data === "string") ws.send("d" + message.data);
      else {
        const framed = new Uint8Array(message.data.byteLength + 1);
        framed[0] = TAG_DATA;
        framed.set(new Uint8Array(message.data), 1);
        ws.send(framed.buffer);
      }
    }

    // ----- long-polling transport -----

    async _connectPolling(sse) {
      const generation = ++this._generation;
      const transport = sse ? "sse" : "polling";
      this._polls = new Set();
      try {
        if (!this._sid) {
          const token = await this._openToken();
          if (generation !== this._generation) return;
          const params = { wsgate: "open" };
          if (token) params[this._tokenParam] = token;
          const answer = await this._fetch("POST", withQuery(httpUrl(this.url), params).toString(), { protocols: this._protocols });
          if (generation !== this._generation) return;
          if (answer.status !== 200) return this._openRefused(answer);
          this._established(answer.body, transport);
        } else {
          // A resume proves nothing yet: the backoff is reset by the first answer.
          this.transport = transport;
          this._emit("transport", transport);
        }
      } catch (e) {
        if (generation === this._generation) { this._emit("error"); this._retry(); }
        return;
      }
      this._pumpSends();
      if (sse) this._eventStream(generation); else this._pollLoop(generation);
    }

    // Server-Sent Events down, POST up. Events are acknowledged by POSTs (ack-only batches
    // when there is nothing to send), since being written to the stream proves nothing.
    _eventStream(generation) {
      const es = new EventSource(this._sessionUrl("events", { wsgate_ack: this._received }));
      this._events = es;
      let acked = this._received;
      const seq = (e) => Number(e.lastEventId);
      es.onopen = () => { if (generation === this._generation) this._backoff.attempt = 0; };
      es.addEventListener("text", (e) => this._deliver(seq(e), JSON.parse(e.data)));
      es.addEventListener("binary", (e) => this._deliver(seq(e), fromBase64(e.data)));
      es.addEventListener("close", (e) => {
        const close = JSON.parse(e.data);
        this._received = seq(e);
        this._fetch("GET", this._sessionUrl("poll", { wsgate_ack: this._received })).catch(() => {});
        this._finish(close.code, close.reason, true);
      });
      es.onerror = async () => {
        if (generation !== this._generation || es.readyState !== EventSource.CLOSED) return;
        // The stream was refused (EventSource hides the status): ask with a poll.
        try {
          const answer = await this._fetch("GET", this._sessionUrl("poll", { wsgate_ack: this._received }));
          if (generation !== this._generation) return;
          if (answer.status === 410 || answer.status === 403) return this._sessionGone(answer.status === 410 ? CLOSE_GONE : CLOSE_FORBIDDEN, answer.body.error);
        } catch (err) { /* the network is down: retry below */ }
        if (generation === this._generation) this._retry();
      };
      this._ackTimer = setInterval(() => {
        if (this._received !== acked && this._pumping !== generation && generation === this._generation) {
          acked = this._received;
          this._fetch("POST", this._sessionUrl("send"), { seq: this._nextSeq, messages: [], ack: acked }).catch(() => {});
        }
      }, ACK_EVERY_MS);
    }

    _openRefused(answer) {
      // 4xx: this session can never open (bad route, origin...); 5xx: try again later.
      if (answer.status >= 400 && answer.status < 500) {
        this._emit("error");
        return this._finish(1006, (answer.body && answer.body.error) || "refused with " + answer.status, false);
      }
      this._retry();
    }

    async _pollLoop(generation) {
      while (generation === this._generation && this.readyState !== CLOSED) {
        let answer;
        try {
          answer = await this._fetch("GET", this._sessionUrl("poll", { wsgate_ack: this._received }));
        } catch (e) {
          if (generation === this._generation) this._retry();
          return;
        }
        if (generation !== this._generation) return;
        if (answer.status === 410 || answer.status === 403) return this._sessionGone(answer.status === 410 ? CLOSE_GONE : CLOSE_FORBIDDEN, answer.body.error);
        if (answer.status === 409) continue;
        if (answer.status !== 200) return this._retry();
        this._backoff.attempt = 0;
        for (const event of answer.body.events) {
          if (event.close) {
            this._received = event.seq;
            // Acknowledge the close so the gateway can let the session go.
            this._fetch("GET", this._sessionUrl("poll", { wsgate_ack: event.seq })).catch(() => {});
            return this._finish(event.close.code, event.close.reason, true);
          }
          this._deliver(event.seq, event.text !== undefined ? event.text : fromBase64(event.binary));
        }
      }
    }

    // One pump per transport generation: a pump whose generation was abandoned (its request
    // still in flight during a resume) ends on its own, and never blocks the next one; the
    // gateway skips anything both sent.
    async _pumpSends() {
      if (this._pumping === this._generation || !this.transport || this.transport === "websocket" || !this._sid) return;
      const generation = this._generation;
      this._pumping = generation;
      try {
        while (this._outbox.length && generation === this._generation) {
          const batch = this._outbox.slice(0, 256);
          const body = {
            seq: batch[0].seq,
            messages: batch.map((m) => typeof m.data === "string" ? { text: m.data } : { binary: toBase64(m.data) }),
            ack: this._received,
          };
          const answer = await this._fetch("POST", this._sessionUrl("send"), body);
          if (generation !== this._generation) return;
          if (answer.status === 200) this._backoff.attempt = 0;
          if (answer.status === 200 || answer.status === 409) this._dropAcked(answer.body.received);
          else if (answer.status === 410) return this._sessionGone(CLOSE_GONE, answer.body.error);
          else if (answer.status === 429) return; // the session's close event follows on the poll
          else throw new Error("send answered " + answer.status);
        }
      } catch (e) {
        if (generation === this._generation) this._retry();
      } finally {
        if (this._pumping === generation) this._pumping = null;
      }
    }

    async _fetch(method, url, body) {
      const controller = new AbortController();
      this._polls.add(controller);
      try {
        // text/plain keeps cross-origin POSTs "simple" (no preflight); the gateway reads JSON.
        const response = await fetch(url, {
          method,
          body: body === undefined ? undefined : JSON.stringify(body),
          headers: body === undefined ? undefined : { "content-type": "text/plain" },
          signal: controller.signal,
          cache: "no-store",
        });
        let parsed = {};
        try { parsed = await response.json(); } catch (e) { /* not JSON */ }
        return { status: response.status, body: parsed };
      } finally {
        this._polls.delete(controller);
      }
    }
  }

  Object.assign(WsgateSocket, { CONNECTING, OPEN, CLOSING, CLOSED });
  global.WsgateSocket = WsgateSocket;
})(typeof window !== "undefined" ? window : globalThis);
