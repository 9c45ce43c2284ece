// wsession demo page: chat, presence, rooms and an admin panel over one WebSocket.
// Plain browser JavaScript, no build step. The server protocol is documented in
// example_app/app.py; everything user-supplied is rendered with textContent, never as HTML.
"use strict";

(() => {
  // -- configuration -----------------------------------------------------------------------

  const BACKOFF_BASE_MS = 1000; // retries wait up to 1 s, then 2, 4, 8 ... (full jitter)
  const BACKOFF_MAX_MS = 30000;
    const KICK_CODE = 4000; // the server closes a kicked connection with this code
  const MAX_LOG_ENTRIES = 500;
  const TOKEN_KEY = "wsession.adminToken";

  // Admin endpoints in one place. Today the public /api routes; when the token-protected
  // /admin router is deployed only these need to change (adminFetch already sends the token).
  const ADMIN_API = {
    stats: () => "/api/stats",
    sessions: () => "/api/sessions",
    kick: (id) => `/api/kick/${encodeURIComponent(id)}`,
  };

  // Close codes after which the client comes back (the rest are final: 4000 kicked, 4401
  // expired, 4403 revoked, 4409 resumed elsewhere, 1008 refused).
  const RECONNECT_ON = [1001, 1005, 1006, 1011, 1012, 1013, 4408];

  const CLOSE_REASONS = {
    1000: "closed",
    1001: "server going away",
    1006: "connection lost",
    1011: "server error",
    1012: "server restarting",
    1013: "server busy",
    4408: "idle timeout",
  };

  // -- state -------------------------------------------------------------------------------

  const state = {
    name: "",
    myId: null,
    client: null, // the WSessionClient
    online: new Map(), // id -> name, the others' connections (tabs), from the lobby's diffs
    roomPeople: new Map(), // room -> Map(id -> name), from each room's diffs
    gone: new Set(), // ids announced offline; /api/sessions can list them a moment longer
    rooms: new Set(), // rooms we are in; re-joined after a reconnect
    connectAttempts: 0, // WebSockets opened since load (tests read it)
    countdownTimer: null,
    kicked: false,
    selectOnJoin: null, // a room to select in the "To" menu when the server confirms the join
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  };

  // -- names -------------------------------------------------------------------------------

  // Mirrors the server: 1-32 printable characters (Python's str.isprintable).
  const PRINTABLE = /^(?:[^\p{C}\p{Z}]| )+$/u;

  function nameProblem(name) {
    const length = [...name].length;
    if (length < 1 || length > 32) return "A name has 1 to 32 characters.";
    if (!PRINTABLE.test(name)) return "A name cannot contain control or separator characters.";
    return null;
  }

  function askForName(problem) {
    const dialog = $("name-dialog");
    $("name-error").textContent = problem || "";
    $("name-error").hidden = !problem;
    $("name-input").value = state.name;
    if (!dialog.open) dialog.showModal();
  }

  function onNameSubmit(event) {
    event.preventDefault();
    const name = $("name-input").value;
    const problem = nameProblem(name);
    if (problem) {
      askForName(problem);
      return;
    }
    $("name-dialog").close();
    const url = new URL(location.href);
    url.searchParams.set("name", name); // a reload keeps the name
    history.replaceState(null, "", url);
    start(name);
  }

  // -- connection --------------------------------------------------------------------------

  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    status.textContent = text;
    $("reconnect-button").hidden = !["reconnecting", "kicked", "closed"].includes(kind);
  }

  function clearTimers() {
    clearInterval(state.countdownTimer);
    state.countdownTimer = null;
  }

  function start(name) {
    state.name = name;
    $("me-name").textContent = name;
    document.title = `${name} · wsession demo`;
    connect();
  }

  // The connection is the package's own client (/wsession-client.js, WSessionClient): it
  // reconnects with backoff and jitter and resumes the session with every missed message.
  function newClient() {
    const page = state;
    // Counts every WebSocket the client opens (tests read connectAttempts).
    class CountedSocket extends WebSocket {
      constructor(...args) {
        super(...args);
        page.connectAttempts += 1;
        document.body.dataset.connectAttempts = String(page.connectAttempts);
      }
    }
    const client = new WSessionClient(`/ws?name=${encodeURIComponent(state.name)}`, {
      backoffBase: BACKOFF_BASE_MS,
      backoffCap: BACKOFF_MAX_MS,
      reconnectOn: RECONNECT_ON,
      WebSocket: CountedSocket,
      autoConnect: false,
    });
    client.on("welcome", onWelcome);
    client.on("message", handle);
    client.on("recovered", ({ replayed }) => {
      const count = replayed === null ? "the" : String(replayed);
      addLog("system", "server", `Reconnected: same session, ${count} missed message(s) recovered.`, {
        event: "recovered",
      });
    });
    client.on("not_recovered", () => {
      // A new session: what we knew of the old one (people, rooms' people) is stale.
      state.online.clear();
      state.roomPeople.clear();
      addLog("system", "server", "Reconnected as a new session (the old one could not be recovered).", {
        event: "not_recovered",
      });
    });
    client.on("reconnecting", ({ attempt, delay, code, reason }) =>
      onLost(code, reason, delay, attempt),
    );
    client.on("close", ({ code, reason }) => onClosed(code, reason));
    return client;
  }

  function connect() {
    clearTimers();
    state.kicked = false;
    setStatus("connecting", "connecting…");
    if (state.client === null) state.client = newClient();
    state.client.connect();
  }

  function forgetConnection() {
    state.myId = null;
    $("me-id").textContent = "";
  }

  function onLost(code, reason, delay, attempt) {
    const wasConnected = state.myId !== null;
    forgetConnection();
    const why = CLOSE_REASONS[code] || reason || `closed with code ${code}`;
    if (wasConnected) addLog("system", "server", `Disconnected (${why}).`);
    const due = Date.now() + delay;
    const show = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setStatus("reconnecting", `reconnecting in ${seconds}s (attempt ${attempt}, ${why})`);
    };
    show();
    clearTimers();
    state.countdownTimer = setInterval(show, 500);
  }

  function onClosed(code, reason) {
    clearTimers();
    forgetConnection();
    state.online.clear();
    state.roomPeople.clear();
    renderPeople();
    if (code === KICK_CODE) {
      state.kicked = true;
      setStatus("kicked", "kicked by an admin — not reconnecting");
      addLog("system", "server", "You were kicked. Use “Reconnect now” to come back.");
      return;
    }
    const why = CLOSE_REASONS[code] || reason || `closed with code ${code}`;
    setStatus("closed", `closed (${why})`);
    addLog("system", "server", `Closed (${why}). Use “Reconnect now” to come back.`);
  }

  function send(message) {
    if (state.client === null || state.myId === null || !state.client.send(message)) {
      addLog("error", "you", "Not connected: the message was not sent.");
      return false;
    }
    return true;
  }

  // -- server messages ---------------------------------------------------------------------

  function onWelcome(message) {
    clearTimers();
    state.myId = message.id;
    $("me-id").textContent = message.id;
    if (!message.resumed) {
      // A new session: the lobby as of the last diff, and our rooms joined again. A resumed
      // one keeps both: the replay that follows brings them up to date.
      state.online = new Map();
      for (const { name, ids } of message.presence || []) {
        for (const id of ids) if (id !== message.id) state.online.set(id, name);
      }
      for (const room of state.rooms) send({ type: "join", group: room });
    }
    renderPeople();
    setStatus("connected", message.resumed ? "connected (resumed)" : "connected");
    refreshAdmin();
  }

  function handle(message) {
    switch (message.type) {
      case "presence_diff":
        if (message.topic === "lobby") onLobbyDiff(message);
        else if (state.roomPeople.has(message.topic)) {
          applyDiff(state.roomPeople.get(message.topic), message);
          renderRooms();
        }
        break;
      case "dm":
        addLog("dm", message.from === "server" ? "server" : message.name, message.text, {
          from: message.from,
          arrow: "→ you",
        });
        break;
      case "broadcast":
        addLog("broadcast", who(message), message.text, { from: message.from, arrow: "→ everyone" });
        break;
      case "group":
        addLog("group", who(message), message.text, {
          from: message.from,
          arrow: `→ #${message.group}`,
          room: message.group,
        });
        break;
      case "presence_sync":
        // After a resume: the topic as it is now (diffs sent while the session waited in the
        // server's store may be missing), applied as a diff from what this page shows.
        if (message.topic === "lobby") onLobbyDiff(syncDiff(state.online, message.presence, state.myId));
        else if (state.roomPeople.has(message.topic)) {
          const people = state.roomPeople.get(message.topic);
          applyDiff(people, syncDiff(people, message.presence, null));
          renderRooms();
        }
        break;
      case "joined":
        state.rooms.add(message.group);
        state.roomPeople.set(message.group, new Map()); // filled by the diff that follows
        renderRooms();
        if (state.selectOnJoin === message.group) {
          state.selectOnJoin = null;
          selectTarget(`room:${message.group}`);
        }
        break;
      case "left":
        state.rooms.delete(message.group);
        state.roomPeople.delete(message.group);
        renderRooms();
        addLog("system", "you", `left #${message.group}`);
        break;
      case "echo":
        addLog("system", "echo", message.text);
        break;
      case "error":
        addLog("error", "server", message.error + (message.to ? ` (${message.to})` : ""));
        break;
      default:
        addLog("error", "server", `unknown message type ${JSON.stringify(message.type)}`);
    }
  }

  // Diffs are set operations on the ids of each person: a repeated join changes nothing.
  function applyDiff(people, diff) {
    for (const { ids } of diff.leaves) for (const id of ids) people.delete(id);
    for (const { name, ids } of diff.joins) for (const id of ids) people.set(id, name);
  }

  // The diff from what the page shows (``shown``: id -> name) to ``presence`` (a sync's list).
  function syncDiff(shown, presence, exclude) {
    const now = new Map();
    for (const { name, ids } of presence) for (const id of ids) if (id !== exclude) now.set(id, name);
    const joins = [];
    const leaves = [];
    for (const [id, name] of now) if (!shown.has(id)) joins.push({ name, ids: [id] });
    for (const [id, name] of shown) if (!now.has(id)) leaves.push({ name, ids: [id] });
    return { joins, leaves };
  }

  function onLobbyDiff(diff) {
    for (const { name, ids } of diff.leaves) {
      for (const id of ids) {
        if (!state.online.delete(id)) continue;
        state.gone.add(id);
        if (state.gone.size > 1000) state.gone.delete(state.gone.values().next().value);
        const still = tabsOf(name) > 0;
        addLog("presence", name, still ? "closed a tab" : "went offline", { id, event: "offline" });
      }
    }
    for (const { name, ids } of diff.joins) {
      for (const id of ids) {
        if (id === state.myId || state.online.has(id)) continue;
        const again = tabsOf(name) > 0;
        state.online.set(id, name);
        addLog("presence", name, again ? "opened another tab" : "came online", { id, event: "online" });
      }
    }
    renderPeople();
    refreshAdmin();
  }

  const tabsOf = (name) => [...state.online.values()].filter((n) => n === name).length;

  // One entry per person (name): their first connection is the one a direct message goes to.
  function peopleOf(online) {
    const people = new Map();
    for (const [id, name] of online) {
      if (!people.has(name)) people.set(name, []);
      people.get(name).push(id);
    }
    for (const ids of people.values()) ids.sort();
    return [...people].sort((a, b) => a[0].localeCompare(b[0]));
  }

  const who = (message) => (message.from === state.myId ? "you" : message.name);

  // -- rendering ---------------------------------------------------------------------------

  function addLog(kind, author, text, extra = {}) {
    const log = $("log");
    const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const dataset = { testid: "message", kind };
    for (const key of ["from", "id", "event", "room"]) {
      if (extra[key] !== undefined) dataset[key] = extra[key];
    }
    const entry = el(
      "li",
      { class: `msg msg-${kind}`, dataset },
      el("time", { text: time }),
      el("span", { class: "author", text: author }),
      extra.arrow ? el("span", { class: "arrow", text: extra.arrow }) : "",
      el("span", { class: "text", text: String(text ?? "") }),
    );
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(entry);
    while (log.childElementCount > MAX_LOG_ENTRIES) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function renderPeople() {
    const list = $("online-list");
    const people = peopleOf(state.online);
    const target = $("target-select").value;
    list.replaceChildren(
      ...people.map(([name, ids]) =>
        el(
          "li",
          {},
          el(
            "button",
            {
              type: "button",
              class: `person${ids.some((id) => target === `dm:${id}`) ? " selected" : ""}`,
              title: `message ${name} (${ids[0]})`,
              dataset: { testid: "person", id: ids[0], name, tabs: String(ids.length) },
              onclick: () => selectTarget(`dm:${ids[0]}`),
            },
            el("span", { class: "dot", "aria-hidden": "true" }),
            el("span", { class: "person-name", text: name }),
            ids.length > 1 ? el("span", { class: "person-tabs", text: `${ids.length} tabs` }) : "",
            el("code", { class: "person-id", text: ids[0].slice(0, 6) }),
          ),
        ),
      ),
    );
    const names = new Set(people.map(([name]) => name));
    if (state.myId) names.add(state.name);
    $("online-count").textContent = String(names.size);
    $("online-empty").hidden = people.length > 0 || state.myId === null;
    renderTargets();
  }

  function renderRooms() {
    const list = $("room-list");
    const rooms = [...state.rooms].sort();
    list.replaceChildren(
      ...rooms.map((room) =>
        el(
          "li",
          { dataset: { testid: "room", room, people: String(peopleOf(state.roomPeople.get(room) ?? new Map()).length) } },
          el("button", {
            type: "button",
            class: "room-name",
            text: `#${room} (${peopleOf(state.roomPeople.get(room) ?? new Map()).length})`,
            title: `write to #${room}`,
            onclick: () => selectTarget(`room:${room}`),
          }),
          el("button", {
            type: "button",
            class: "small ghost",
            text: "Leave",
            dataset: { testid: "leave-button", room },
            onclick: () => send({ type: "leave", group: room }),
          }),
        ),
      ),
    );
    renderTargets();
  }

  // The "To" menu: everyone, each person (direct message), each room we are in.
  function renderTargets() {
    const select = $("target-select");
    const previous = select.value;
    const options = [el("option", { value: "everyone", text: "Everyone (broadcast)" })];
    for (const [name, ids] of peopleOf(state.online)) {
      options.push(el("option", { value: `dm:${ids[0]}`, text: `${name} (direct)` }));
    }
    for (const room of [...state.rooms].sort()) {
      options.push(el("option", { value: `room:${room}`, text: `#${room}` }));
    }
    select.replaceChildren(...options);
    select.value = options.some((o) => o.value === previous) ? previous : "everyone";
    select.dataset.target = select.value;
  }

  function selectTarget(value) {
    const select = $("target-select");
    select.value = value;
    select.dataset.target = select.value;
    for (const button of document.querySelectorAll("#online-list .person")) {
      button.classList.toggle("selected", value === `dm:${button.dataset.id}`);
    }
    $("message-input").focus();
  }

  // -- user actions ------------------------------------------------------------------------

  function onSend(event) {
    event.preventDefault();
    const input = $("message-input");
    const text = input.value;
    if (!text.trim()) return;
    const target = $("target-select").value;
    let sent;
    if (target.startsWith("dm:")) {
      const to = target.slice(3);
      sent = send({ type: "dm", to, text });
      // The server does not echo direct messages: show our own copy.
      if (sent) {
        addLog("dm-out", "you", text, { arrow: `→ ${state.online.get(to) ?? to}`, id: to });
      }
    } else if (target.startsWith("room:")) {
      sent = send({ type: "group", group: target.slice(5), text });
    } else {
      sent = send({ type: "broadcast", text });
    }
    if (sent) input.value = "";
  }

  function onJoin(event) {
    event.preventDefault();
    const input = $("room-input");
    const room = input.value.trim();
    if (!room) return;
    if (send({ type: "join", group: room })) {
      input.value = "";
      state.selectOnJoin = room; // select it in the "To" menu once the server confirms
    }
  }

  // -- admin panel -------------------------------------------------------------------------

  function adminFetch(url, init = {}) {
    const headers = new Headers(init.headers);
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    return fetch(url, { ...init, headers });
  }

  async function adminJson(url, init) {
    const response = await adminFetch(url, init);
    if (response.status === 401 || response.status === 403) {
      throw new Error("the admin token is missing or wrong");
    }
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // One refresh at a time; requests that arrive meanwhile fold into one more refresh.
  let refreshing = false;
  let refreshAgain = false;

  async function refreshAdmin() {
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    try {
      do {
        refreshAgain = false;
        try {
          const [stats, sessions] = await Promise.all([
            adminJson(ADMIN_API.stats()),
            adminJson(ADMIN_API.sessions()),
          ]);
          renderStats(stats);
          renderSessions(sessions.sessions);
          showAdminError(null);
        } catch (error) {
          showAdminError(error.message);
        }
      } while (refreshAgain);
    } finally {
      refreshing = false;
    }
  }

  function renderStats(stats) {
    // /api/stats names, with the admin API's names as a fallback.
    const values = {
      live: stats.live,
      connected_total: stats.connected_total ?? stats.accepted,
      disconnected_total: stats.disconnected_total ?? stats.ended,
      rejected_total: stats.rejected_total ?? stats.refused,
    };
    for (const dd of $("stats").querySelectorAll("dd[data-stat]")) {
      const value = values[dd.dataset.stat];
      dd.textContent = value === undefined ? "–" : String(value);
    }
  }

  function renderSessions(sessions) {
    $("session-list").replaceChildren(
      ...sessions.filter((s) => !state.gone.has(s.id)).map((s) => {
        const name = s.name ?? s.user_key ?? "?";
        const mine = s.id === state.myId;
        return el(
          "li",
          { dataset: { testid: "session", id: s.id } },
          el("span", { class: "person-name", text: mine ? `${name} (you)` : name }),
          el("code", { class: "person-id", text: s.id.slice(0, 6), title: s.id }),
          el("button", {
            type: "button",
            class: "small danger",
            text: "Kick",
            title: `close ${name}'s connection (code ${KICK_CODE})`,
            dataset: { testid: "kick-button", id: s.id, name },
            onclick: () => kick(s.id, name),
          }),
        );
      }),
    );
  }

  async function kick(id, name) {
    try {
      await adminJson(ADMIN_API.kick(id), { method: "POST" });
      addLog("system", "admin", `kicked ${name}`);
    } catch (error) {
      showAdminError(`kick failed: ${error.message}`);
    }
    refreshAdmin();
  }

  function showAdminError(message) {
    $("admin-error").textContent = message || "";
    $("admin-error").hidden = !message;
  }

  // -- start -------------------------------------------------------------------------------

  function init() {
    $("name-form").addEventListener("submit", onNameSubmit);
    $("composer").addEventListener("submit", onSend);
    $("join-form").addEventListener("submit", onJoin);
    $("target-select").addEventListener("change", (e) => selectTarget(e.target.value));
    $("reconnect-button").addEventListener("click", connect);
    $("stats-refresh").addEventListener("click", refreshAdmin);
    // Back online (laptop woke up, Wi-Fi returned): retry now rather than at the next tick.
    window.addEventListener("online", () => {
      if (state.client !== null && state.client.state === "reconnecting") connect();
    });
    const token = $("admin-token");
    token.value = localStorage.getItem(TOKEN_KEY) || "";
    token.addEventListener("change", () => {
      if (token.value) localStorage.setItem(TOKEN_KEY, token.value);
      else localStorage.removeItem(TOKEN_KEY);
      refreshAdmin();
    });
    renderPeople();
    renderRooms();

    // For tests and curious developers: read-only views of the page's state.
    window.wsessionDemo = {
      get id() {
        return state.myId;
      },
      get connectAttempts() {
        return state.connectAttempts;
      },
      get kicked() {
        return state.kicked;
      },
      get rooms() {
        return [...state.rooms];
      },
    };

    const name = new URLSearchParams(location.search).get("name");
    if (name === null) {
      askForName(null);
    } else if (nameProblem(name)) {
      askForName(nameProblem(name));
    } else {
      start(name);
    }
  }

  init();
})();
