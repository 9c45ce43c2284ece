/*
 * wsession-client.js: a WebSocket client that resumes its wsession session after a drop.
 * Part of the wsession package (MIT). One file, no build step, plain ES2020.
 *
 * Load it as a classic script (it defines the global `WSessionClient`) or import it from a
 * module for that side effect (`import "/wsession-client.js"`, then `globalThis.WSessionClient`).
 * Serve it with `wsession.client_script_route()`.
 *
 * Wire contract (the example app's, issue 14):
 * - the server's first message is `{"type": "welcome", "id", "resume": TOKEN, "resumed": bool}`,
 *   optionally with `"replay": K` (how many missed messages follow it);
 * - every other server message carries `"seq": N`, 1, 2, 3, ... per session, never reset by
 *   a resume;
 * - a reconnect adds `resume=TOKEN&last=N` to the query (N: the highest seq delivered to the
 *   app); the token rotates on every resume, so the latest welcome's token is the one to send.
 *
 * Documentation: docs/resumption-client.md.
 */
(function (root) {
  "use strict";

  const DEFAULTS = Object.freeze({
    // Close codes after which the client reconnects: going away, no status, abnormal
    // (connection lost or never made), server error, service restart, try again later. Any
    // other code (1000, 1008, 4401, 4403, 4409 "resumed by a new connection", ...) means
    // "do not come back" and ends the client.
    reconnectOn: Object.freeze([1001, 1005, 1006, 1011, 1012, 1013]),
    backoffBase: 500, // ms: the first retry waits up to this long
    backoffCap: 10000, // ms: no retry waits longer than this
    maxAttempts: Infinity, // failed reconnects in a row before giving up
    protocols: undefined, // WebSocket subprotocols, passed through
    autoConnect: true, // connect from the constructor
    random: Math.random, // the jitter source (tests make it deterministic)
    WebSocket: undefined, // the WebSocket class; default: the global one
    // The names the server uses (its settings resume_seq_field, resume_token_param and
    // resume_last_param).
    seqField: "seq",
    resumeParam: "resume",
    lastParam: "last",
  });

  const EVENTS = Object.freeze([
    "open",
    "welcome",
    "message",
    "recovered",
    "not_recovered",
    "reconnecting",
    "close",
    "error",
  ]);

  const OPEN = 1;

  // A handler that throws must not break the client; the error still reaches the console.
  const report =
    typeof root.reportError === "function"
      ? (error) => root.reportError(error)
      : (error) => setTimeout(() => {
          throw error;
        });

  function checkOptions(options) {
    for (const key of Object.keys(options)) {
      if (!(key in DEFAULTS)) throw new TypeError(`WSessionClient: unknown option "${key}"`);
    }
    const merged = { ...DEFAULTS, ...options };
    const { backoffBase, backoffCap, maxAttempts, reconnectOn, random } = merged;
    if (!(backoffBase > 0) || !Number.isFinite(backoffBase)) {
      throw new RangeError("WSessionClient: backoffBase must be a positive number of ms");
    }
    if (!(backoffCap >= backoffBase) || !Number.isFinite(backoffCap)) {
      throw new RangeError("WSessionClient: backoffCap must be a number >= backoffBase");
    }
    if (!(maxAttempts >= 0) || (maxAttempts !== Infinity && !Number.isInteger(maxAttempts))) {
      throw new RangeError("WSessionClient: maxAttempts must be an integer >= 0 or Infinity");
    }
    if (!Array.isArray(reconnectOn) || !reconnectOn.every(Number.isInteger)) {
      throw new TypeError("WSessionClient: reconnectOn must be an array of close codes");
    }
    if (typeof random !== "function") throw new TypeError("WSessionClient: random must be a function");
    for (const name of ["seqField", "resumeParam", "lastParam"]) {
      if (typeof merged[name] !== "string" || merged[name] === "") {
        throw new TypeError(`WSessionClient: ${name} must be a non-empty string`);
      }
    }
    merged.reconnectOn = Object.freeze([...reconnectOn]);
    return Object.freeze(merged);
  }

  class WSessionClient {
    /**
     * @param {string} url  ws://, wss://, http(s):// or a path relative to the page; its query
     *   (e.g. `?name=Alice`) is kept on every connection.
     * @param {object} [options]  see DEFAULTS above and docs/resumption-client.md.
     */
    constructor(url, options = {}) {
      this.options = checkOptions(options);
      this.url = String(url);
      /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
      this.state = "idle";
      /** The session id of the latest welcome (null before the first). */
      this.sessionId = null;
      /** The highest seq delivered to the app in this session (0: none yet). */
      this.lastSeq = 0;
      /** Failed reconnects since the last welcome. */
      this.attempt = 0;
      /** Messages dropped because their seq was already delivered. */
      this.duplicates = 0;
      this._token = null;
      this._handlers = new Map(EVENTS.map((name) => [name, new Set()]));
      this._socket = null;
      this._welcomed = false;
      this._timer = null;
      this._closing = false;
      this._replay = null;
      if (this.options.autoConnect) this.connect();
    }

    /** Call `fn(detail)` on every `event`; returns a function that removes it again. */
    on(event, fn) {
      const handlers = this._handlers.get(event);
      if (handlers === undefined) throw new TypeError(`WSessionClient: unknown event "${event}"`);
      if (typeof fn !== "function") throw new TypeError("WSessionClient: a handler is a function");
      handlers.add(fn);
      return () => this.off(event, fn);
    }

    /** Remove a handler added with `on`. */
    off(event, fn) {
      const handlers = this._handlers.get(event);
      if (handlers !== undefined) handlers.delete(fn);
    }

    /**
     * Open the connection (done by the constructor unless `autoConnect: false`); while
     * waiting to reconnect, reconnect now (e.g. on the window's `online` event).
     */
    connect() {
      if (this.state === "connecting" || this.state === "open") return;
      clearTimeout(this._timer);
      if (this.state !== "reconnecting") this.attempt = 0;
      this._closing = false;
      this._open();
    }

    /** Send `data` as JSON; returns false (and sends nothing) while not connected. */
    send(data) {
      const socket = this._socket;
      if (socket === null || socket.readyState !== OPEN) return false;
      socket.send(JSON.stringify(data));
      return true;
    }

    /** Close for good: no reconnect follows; the `close` event fires once the socket closed. */
    close(code = 1000, reason = "") {
      this._closing = true;
      clearTimeout(this._timer);
      this._timer = null;
      const socket = this._socket;
      if (socket !== null) {
        socket.close(code, reason);
      } else if (this.state !== "closed" && this.state !== "idle") {
        this._finish({ code, reason, wasClean: true, gaveUp: false }); // between two attempts
      }
    }

    // -- internals ------------------------------------------------------------------------

    _emit(event, detail) {
      for (const fn of [...this._handlers.get(event)]) {
        try {
          fn(detail);
        } catch (error) {
          report(error);
        }
      }
    }

    _connectUrl() {
      const base = typeof location !== "undefined" ? location.href : undefined;
      const url = new URL(this.url, base);
      if (url.protocol === "http:") url.protocol = "ws:";
      else if (url.protocol === "https:") url.protocol = "wss:";
      const { resumeParam, lastParam } = this.options;
      url.searchParams.delete(resumeParam);
      url.searchParams.delete(lastParam);
      if (this._token !== null) {
        url.searchParams.set(resumeParam, this._token);
        url.searchParams.set(lastParam, String(this.lastSeq));
      }
      return url.toString();
    }

    _open() {
      this._timer = null;
      const url = this._connectUrl();
      const Socket = this.options.WebSocket || root.WebSocket;
      const socket = new Socket(url, this.options.protocols);
      this._socket = socket;
      this._welcomed = false;
      this.state = "connecting";
      // Handlers check `socket === this._socket`: events of a replaced socket are stale.
      socket.onopen = () => {
        if (socket !== this._socket) return;
        this.state = "open";
        this._emit("open", { url, attempt: this.attempt });
      };
      socket.onmessage = (event) => {
        if (socket === this._socket) this._receive(event.data);
      };
      // An error is always followed by a close event (code 1006); the decision is made there.
      socket.onerror = () => {};
      socket.onclose = (event) => {
        if (socket !== this._socket) return;
        this._socket = null;
        this._closed(event.code, event.reason, event.wasClean);
      };
    }

    _receive(data) {
      let message;
      try {
        if (typeof data !== "string") throw new TypeError("binary frames are not supported");
        message = JSON.parse(data);
      } catch (error) {
        this._emit("error", { error, data });
        return;
      }
      if (!this._welcomed && message !== null && message.type === "welcome") {
        this._welcome(message);
        return;
      }
      const field = this.options.seqField;
      const seq = message !== null && typeof message[field] === "number" ? message[field] : null;
      if (seq !== null) {
        if (seq <= this.lastSeq) {
          this.duplicates += 1; // delivered already (a replay overlapping live traffic)
          return;
        }
        this.lastSeq = seq;
      }
      this._emit("message", message);
      const replay = this._replay;
      if (replay !== null && seq !== null && seq >= replay.until) {
        this._replay = null;
        this._emit("recovered", { ...replay.detail, replayed: seq - replay.detail.last });
      }
    }

    _welcome(welcome) {
      this._welcomed = true;
      this.attempt = 0;
      const previousId = this.sessionId;
      const last = this.lastSeq;
      const resumed = previousId !== null && welcome.resumed === true && welcome.id === previousId;
      this._token = typeof welcome.resume === "string" ? welcome.resume : null;
      this.sessionId = welcome.id;
      if (!resumed) {
        this.lastSeq = 0; // a new session numbers its messages from 1 again
        this._replay = null;
        if (previousId !== null) this._emit("not_recovered", { id: welcome.id, previousId, last, welcome });
        this._emit("welcome", welcome);
        return;
      }
      this._emit("welcome", welcome);
      const count = welcome.replay;
      const detail = { id: welcome.id, last, replayed: Number.isInteger(count) ? 0 : null, welcome };
      if (Number.isInteger(count) && count > 0) {
        this._replay = { until: last + count, detail }; // "recovered" after the last of them
      } else {
        this._emit("recovered", detail);
      }
    }

    _closed(code, reason, wasClean) {
      this._replay = null; // an unfinished replay continues on the next resume
      const detail = { code, reason, wasClean, gaveUp: false };
      if (this._closing || !this.options.reconnectOn.includes(code)) {
        this._finish(detail);
        return;
      }
      const { backoffBase, backoffCap, maxAttempts, random } = this.options;
      if (this.attempt >= maxAttempts) {
        this._finish({ ...detail, gaveUp: true });
        return;
      }
      this.attempt += 1;
      // Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))).
      const ceiling = Math.min(backoffCap, backoffBase * 2 ** (this.attempt - 1));
      const delay = Math.floor(random() * ceiling);
      this.state = "reconnecting";
      this._timer = setTimeout(() => this._open(), delay);
      this._emit("reconnecting", { attempt: this.attempt, delay, code, reason });
    }

    _finish(detail) {
      this.state = "closed";
      this._socket = null;
      this._replay = null;
      this._emit("close", detail);
    }
  }

  WSessionClient.defaults = DEFAULTS;
  WSessionClient.events = EVENTS;

  root.WSessionClient = WSessionClient;
  if (typeof module === "object" && module !== null && module.exports) {
    module.exports = { WSessionClient };
  }
})(globalThis);
