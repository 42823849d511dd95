// MACP console: one page, hash routes, live through server-sent events read with fetch().
// The bearer token lives in sessionStorage and travels only in the Authorization header: never in
// a URL (EventSource cannot send headers, so the event stream is read with fetch and parsed here).
"use strict";

const TOKEN_KEY = "macp.console.token";
const TERMINAL = new Set(["RESOLVED", "EXPIRED", "CANCELLED"]);
const STATES = ["OPEN", "SUSPENDED", "RESOLVED", "EXPIRED", "CANCELLED"];
const main = document.getElementById("main");
let stream = null;        // the current event stream {abort}
let view = null;          // the current view {event(type, data), snapshot(), dispose()}
let ticker = null;        // local clock for ages and countdowns (no network)

// --- small helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }
function authHeaders() { return { "Authorization": "Bearer " + token() }; }

async function api(path) {
  const resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (resp.status === 401) { signOut("Your credential was refused; sign in again."); throw new Error("401"); }
  if (!resp.ok) { const body = await resp.json().catch(() => ({})); const e = new Error(body.error || resp.statusText); e.status = resp.status; throw e; }
  return resp.json();
}

function fmtTime(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}
function fmtDateTime(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC") : "–"; }
function fmtAge(ms) {
  if (!ms) return "–";
  let s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d";
}
function fmtDuration(ms) {
  const neg = ms < 0; let s = Math.round(Math.abs(ms) / 1000);
  const text = s < 60 ? s + " s" : s < 3600 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return neg ? "-" + text : text;
}
function badge(state) { return el("span", { class: "badge state-" + state, text: state }); }
function json(value) { return JSON.stringify(value, null, 2); }

// --- the event stream (fetch-based SSE) ----------------------------------------------------------

function openStream(query, onEvent) {
  const ctrl = new AbortController();
  let closed = false, retry = null;
  const live = document.getElementById("live");
  async function run() {
    try {
      const resp = await fetch("/api/events" + query, { headers: authHeaders(), cache: "no-store", signal: ctrl.signal });
      if (resp.status === 401) { signOut("Your credential was refused; sign in again."); return; }
      if (!resp.ok || !resp.body) throw new Error("event stream: " + resp.status);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let type = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) type = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (!data) continue;
          if (type === "ready") { live.textContent = "live"; live.className = "live on"; }
          onEvent(type, JSON.parse(data));
        }
      }
    } catch (err) {
      if (closed) return;
    }
    if (closed) return;
    live.textContent = "reconnecting…"; live.className = "live off";
    retry = setTimeout(run, 1000);   // the stream ended (restart, lag): reattach and reload
  }
  run();
  return { abort() { closed = true; clearTimeout(retry); ctrl.abort(); } };
}

// A view gets its snapshot after the stream says `ready`, so no event can fall between; events
// that arrive while the snapshot loads are applied after it (every update is idempotent).
function liveView(query, v) {
  let loaded = false, queue = [];
  stream = openStream(query, async (type, data) => {
    if (type === "ready") {
      loaded = false; queue = [];
      try { await v.snapshot(); } catch (err) { if (err.message !== "401") v.fail(err); return; }
      loaded = true;
      for (const [t, d] of queue) v.event(t, d);
      queue = [];
    } else if (!loaded) queue.push([type, data]);
    else v.event(type, data);
  });
  view = v;
}

// --- sign-in -------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  teardown();
  renderSignIn(message);
}

function renderSignIn(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("account").hidden = true;
  const error = el("p", { class: "error", role: "alert", text: message || "" });
  const input = el("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
                              "aria-describedby": "token-help" });
  const form = el("form", { class: "signin", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title", text: "Sign in" }),
    el("p", { text: "The console shows the sessions your identity may read: those you started or take part in (observers see all)." }),
    el("label", { for: "token", text: "Bearer token" }), input,
    el("p", { id: "token-help", class: "muted", text: "The same credential as for gRPC. In dev mode the token is your sender name, e.g. alice." }),
    error, el("button", { class: "primary", type: "submit", text: "Sign in" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    const resp = await fetch("/api/whoami", { headers: { "Authorization": "Bearer " + value }, cache: "no-store" });
    if (!resp.ok) { error.textContent = "That credential was refused."; input.focus(); return; }
    sessionStorage.setItem(TOKEN_KEY, value);
    if (!location.hash || location.hash === "#/") location.hash = "#/sessions"; else route();
  });
  main.replaceChildren(form);
  input.focus();
}

// --- routing -------------------------------------------------------------------------------------

function teardown() {
  if (stream) stream.abort();
  stream = null; view = null;
  if (ticker) clearInterval(ticker);
  ticker = null;
}

async function route() {
  teardown();
  if (!token()) { renderSignIn(); return; }
  let who;
  try { who = await api("/api/whoami"); } catch (err) { return; }
  document.getElementById("nav").hidden = false;
  document.getElementById("account").hidden = false;
  document.getElementById("whoami").textContent = who.sender + (who.is_observer ? " (observer)" : "");
  const parts = (location.hash || "#/sessions").slice(2).split("/").map(decodeURIComponent);
  const name = parts[0] || "sessions";
  for (const a of document.querySelectorAll("#nav a")) {
    if ((name === "session" ? "sessions" : name === "mode" ? "modes" : name) === a.dataset.route) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (name === "session" && parts[1]) sessionPage(parts[1]);
  else if (name === "modes" && parts[1]) modePage(parts[1]);
  else if (name === "modes") modesPage();
  else if (name === "policies") policiesPage();
  else sessionsPage();
}

function heading(text) {
  const h = el("h1", { tabindex: "-1", text });
  return h;
}
function show(...nodes) {
  main.replaceChildren(...nodes);
  const h = main.querySelector("h1");
  if (h && document.activeElement && document.activeElement.id !== "token") h.focus({ preventScroll: true });
}

// --- Sessions ------------------------------------------------------------------------------------

function sessionsPage() {
  const rows = new Map();    // session_id -> summary
  const fresh = new Set();
  const stateSel = el("select", { id: "f-state" }, el("option", { value: "", text: "any state" }),
                      STATES.map(s => el("option", { value: s, text: s })));
  const modeSel = el("select", { id: "f-mode" }, el("option", { value: "", text: "any mode" }));
  const count = el("p", { class: "muted", role: "status", "aria-live": "polite" });
  const tbody = el("tbody");
  const table = el("table", { id: "sessions" },
    el("caption", { class: "muted", text: "Sessions you may read; new sessions and changes appear as they happen." }),
    el("thead", {}, el("tr", {}, ["Session", "Mode", "State", "Phase", "Initiator", "Participants", "Age", "Last activity"]
      .map(h => el("th", { scope: "col", text: h })))), tbody);
  show(heading("Sessions"),
       el("div", { class: "filters" }, el("label", { for: "f-state" }, "State", stateSel), el("label", { for: "f-mode" }, "Mode", modeSel)),
       count, table);
  const saved = JSON.parse(sessionStorage.getItem("macp.console.filters") || "{}");
  stateSel.value = saved.state || "";
  function onFilter() {
    sessionStorage.setItem("macp.console.filters", JSON.stringify({ state: stateSel.value, mode: modeSel.value }));
    render();
  }
  stateSel.addEventListener("change", onFilter);
  modeSel.addEventListener("change", onFilter);
  api("/api/modes").then(d => {
    for (const m of d.modes) modeSel.append(el("option", { value: m.name, text: m.name }));
    modeSel.value = saved.mode || "";
    render();
  }).catch(() => {});
  let pending = false;
  function render() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const list = [...rows.values()].filter(s => (!stateSel.value || s.state === stateSel.value) && (!modeSel.value || s.mode === modeSel.value))
        .sort((a, b) => b.started_at_ms - a.started_at_ms);
      tbody.replaceChildren(...list.map(s => {
        const tr = el("tr", { "data-session": s.session_id, class: fresh.has(s.session_id) ? "fresh" : null },
          el("td", { class: "mono" }, el("a", { href: "#/session/" + encodeURIComponent(s.session_id), text: s.session_id })),
          el("td", { text: s.mode }), el("td", {}, badge(s.state)), el("td", { class: "phase", text: s.phase }),
          el("td", { text: s.initiator }), el("td", { text: s.participants.join(", ") }),
          el("td", { class: "age nowrap", "data-ms": s.started_at_ms, text: fmtAge(s.started_at_ms) }),
          el("td", { class: "age nowrap", "data-ms": s.last_activity_ms, text: fmtAge(s.last_activity_ms) + " ago" }));
        return tr;
      }));
      fresh.clear();
      count.textContent = list.length + " of " + rows.size + " session" + (rows.size === 1 ? "" : "s") + " shown" + truncated;
    });
  }
  function upsert(s) {
    const old = rows.get(s.session_id);
    if (old && old.version > s.version) return;
    if (!old || old.state !== s.state || old.phase !== s.phase) fresh.add(s.session_id);
    rows.set(s.session_id, s);
    render();
  }
  ticker = setInterval(() => {
    for (const td of tbody.querySelectorAll("td.age")) {
      const ms = Number(td.dataset.ms);
      td.textContent = fmtAge(ms) + (td.cellIndex === 7 ? " ago" : "");
    }
  }, 1000);
  let truncated = "";
  liveView("", {
    async snapshot() {
      const d = await api("/api/sessions");
      truncated = d.truncated ? " (the newest " + d.sessions.length + " of " + d.total + " are loaded)" : "";
      rows.clear();
      for (const s of d.sessions) rows.set(s.session_id, s);
      render();
    },
    event(type, data) { if (data.session) upsert(data.session); },
    fail(err) { main.append(el("p", { class: "error-box", text: "Could not load sessions: " + err.message })); },
  });
}

// --- Session -------------------------------------------------------------------------------------

function sessionPage(id) {
  let detail = null;
  const seen = new Set();
  const title = heading("Session " + id);
  const status = el("p", { id: "status" });
  const figure = el("figure", { class: "diagram", id: "diagram" });
  const phaseText = el("div", { id: "phase-text" });
  const people = el("tbody");
  const resolution = el("div", { id: "resolution" });
  const timing = el("dl", { class: "kv", id: "timing" });
  const history = el("tbody");
  const back = el("p", {}, el("a", { href: "#/sessions", text: "← all sessions" }));
  show(back, title, status,
       el("section", { "aria-labelledby": "h-phases" }, el("h2", { id: "h-phases", text: "Phases" }), figure, phaseText),
       el("div", { class: "grid" },
         el("section", { class: "panel", "aria-labelledby": "h-people" }, el("h2", { id: "h-people", text: "Participants" }),
           el("table", { id: "participants" }, el("thead", {}, el("tr", {}, ["Participant", "Role", "Messages", "Last spoke"].map(h => el("th", { scope: "col", text: h })))), people)),
         el("section", { class: "panel", "aria-labelledby": "h-res" }, el("h2", { id: "h-res", text: "Resolution" }), resolution),
         el("section", { class: "panel", "aria-labelledby": "h-time" }, el("h2", { id: "h-time", text: "TTL and suspension" }), timing)),
       el("section", { "aria-labelledby": "h-hist" }, el("h2", { id: "h-hist", text: "History" }),
         el("p", { class: "muted", text: "Accepted entries of the session's log, payloads decoded. Refused messages are never part of the history." }),
         el("table", { id: "history" }, el("thead", {}, el("tr", {}, ["#", "Time", "Sender", "Message", "Phase after", "Payload", "Raw"].map(h => el("th", { scope: "col", text: h })))), history)));

  function path() {
    // phases in the order the session went through them (repeats collapsed), and the edges taken
    const entries = detail.history.filter(e => e.kind === "envelope" && e.phase).sort((a, b) => a.index - b.index);
    const phases = [], edges = [];
    let prev = null;
    for (const e of entries) {
      if (prev !== null && e.message_type !== "SessionStart") edges.push([prev, e.phase]);
      if (phases[phases.length - 1] !== e.phase) phases.push(e.phase);
      prev = e.phase;
    }
    if (!phases.length) phases.push(detail.phase);
    return { phases, edges };
  }

  function renderPhases() {
    const p = path();
    const visited = new Set(p.phases);
    for (const g of figure.querySelectorAll("g.phase")) {
      g.classList.toggle("current", g.dataset.phase === detail.phase);
      g.classList.toggle("visited", visited.has(g.dataset.phase) && g.dataset.phase !== detail.phase);
      g.setAttribute("aria-current", g.dataset.phase === detail.phase ? "step" : "false");
    }
    const taken = new Set(p.edges.map(([a, b]) => a + "\u0000" + b));
    for (const e of figure.querySelectorAll("path.edge[data-from]")) e.classList.toggle("taken", taken.has(e.dataset.from + "\u0000" + e.dataset.to));
    const list = el("ol", { class: "phases", id: "phase-list", "aria-label": "Phases of " + detail.mode });
    for (const name of detail.graph.phases) {
      const cls = name === detail.phase ? "current" : visited.has(name) ? "visited" : null;
      list.append(el("li", { class: cls, "aria-current": name === detail.phase ? "step" : null },
        name, name === detail.phase ? " — current phase" : visited.has(name) ? " — passed" : ""));
    }
    const legend = el("details", {}, el("summary", { text: "Transitions of the diagram" }),
      el("ol", {}, detail.graph.edges.map((e, i) => el("li", { value: i + 1 }, e.from + " → " + e.to + ": " + e.label))));
    phaseText.replaceChildren(
      el("p", {}, "Current phase: ", el("strong", { id: "current-phase", text: detail.phase }), " · state ", badge(detail.state)),
      el("p", {}, "Path taken: ", el("span", { class: "path", id: "path", text: p.phases.join(" → ") }),
        detail.path_known ? "" : el("span", { class: "muted", text: " (earlier steps are not known: the history restarts from a checkpoint)" })),
      list, legend);
  }

  function renderPeople() {
    const act = new Map(detail.activity.map(a => [a.participant, a]));
    const names = [detail.initiator, ...detail.participants.filter(p => p !== detail.initiator)];
    for (const a of detail.activity) if (!names.includes(a.participant)) names.push(a.participant);
    people.replaceChildren(...names.map(n => {
      const a = act.get(n);
      const role = [n === detail.initiator ? "initiator" : null, detail.participants.includes(n) ? "participant" : null].filter(Boolean).join(", ") || "other";
      return el("tr", { "data-participant": n }, el("td", { text: n }), el("td", { text: role }),
        el("td", { text: a ? String(a.count) : "0 — has not spoken" }), el("td", { text: a ? fmtTime(a.last_ms) : "–" }));
    }));
  }

  function renderResolution() {
    if (detail.resolution) {
      resolution.replaceChildren(el("p", {}, badge(detail.state), " ", el("span", { class: "muted", text: detail.resolution.type })),
                                 el("pre", { id: "resolution-json", text: json(detail.resolution.value) }));
    } else {
      resolution.replaceChildren(el("p", { class: "muted", text: TERMINAL.has(detail.state) ? "Ended without a resolution (" + detail.state + ")." : "Not resolved yet." }));
    }
  }

  function renderTiming() {
    const items = [["Started", fmtDateTime(detail.started_at_ms)], ["TTL", fmtDuration(detail.ttl_ms)],
                   ["Deadline", fmtDateTime(detail.deadline_ms)]];
    if (detail.state === "OPEN") items.push(["Remaining", el("span", { id: "remaining", text: fmtDuration(detail.deadline_ms - Date.now()) })]);
    if (detail.state === "SUSPENDED") items.push(["Suspended since", fmtDateTime(detail.suspended_at_ms)]);
    items.push(["Suspended in total", fmtDuration(detail.accumulated_suspended_ms || 0)]);
    if (detail.overdue) items.push(["Note", "past its deadline: expires at the next sweep or message"]);
    timing.replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
  }

  function historyRow(e) {
    const raw = el("a", { href: "/api/sessions/" + encodeURIComponent(id) + "/envelopes/" + e.index, text: "raw",
                          "aria-label": "raw envelope " + e.index });
    raw.addEventListener("click", (ev) => { ev.preventDefault(); showRaw(id, e.index); });
    return el("tr", { "data-index": e.index, class: e.kind === "runtime" ? "runtime" : null },
      el("td", { text: String(e.index) }), el("td", { class: "nowrap", text: fmtTime(e.received_at_ms) }),
      el("td", { text: e.sender }), el("td", {}, e.kind === "runtime" ? el("em", { text: e.message_type }) : e.message_type),
      el("td", { class: "phase", text: e.phase || "" }),
      el("td", {}, el("details", {}, el("summary", { text: e.payload_type }), el("pre", { text: json(e.payload) }))),
      el("td", {}, raw));
  }

  function renderAll() {
    title.textContent = "Session " + detail.session_id;
    status.replaceChildren("Mode ", el("a", { href: "#/modes/" + encodeURIComponent(detail.mode), text: detail.mode }),
      " · state ", badge(detail.state), " · initiator ", el("strong", { text: detail.initiator }),
      detail.intent ? " · intent: " + detail.intent : "");
    figure.innerHTML = detail.diagram;   // SVG built by the server from the spec; every text is escaped there
    renderPhases(); renderPeople(); renderResolution(); renderTiming();
    seen.clear();
    history.replaceChildren(...detail.history.map(e => { seen.add(e.index); return historyRow(e); }));
    if (detail.history_error) history.append(el("tr", {}, el("td", { colspan: 7, class: "error-box", role: "alert",
      text: "The history could not be read: " + detail.history_error })));
  }

  ticker = setInterval(() => {
    const r = document.getElementById("remaining");
    if (r && detail) r.textContent = fmtDuration(detail.deadline_ms - Date.now());
  }, 1000);

  async function reload() {
    detail = await api("/api/sessions/" + encodeURIComponent(id));
    renderAll();
  }

  liveView("?session=" + encodeURIComponent(id), {
    snapshot: reload,
    event(type, data) {
      if (!detail || !data.session || data.session.session_id !== id) return;
      if (type === "lifecycle") { reload().catch(() => {}); return; }
      if (type !== "envelope" || seen.has(data.entry.index)) return;
      const e = data.entry;
      seen.add(e.index);
      detail.history.push(e);
      Object.assign(detail, { phase: data.session.phase, state: data.session.state, version: data.session.version });
      const a = detail.activity.find(x => x.participant === e.sender);
      if (a) { a.count += 1; a.last_ms = e.received_at_ms; } else detail.activity.push({ participant: e.sender, count: 1, last_ms: e.received_at_ms });
      const row = historyRow(e); row.classList.add("fresh"); history.append(row);
      status.querySelector(".badge").replaceWith(badge(detail.state));
      renderPhases(); renderPeople();
    },
    fail(err) {
      main.replaceChildren(back, heading("Session " + id), el("p", { class: "error-box", role: "alert",
        text: err.status === 404 ? "No session with this id that you may read." : "Could not load the session: " + err.message }));
    },
  });
}

async function showRaw(id, index) {
  const data = await api("/api/sessions/" + encodeURIComponent(id) + "/envelopes/" + index);
  const close = el("button", { type: "button", class: "primary", text: "Close" });
  const download = el("button", { type: "button", text: "Download protobuf (macp.v1.Envelope)" });
  download.addEventListener("click", async () => {
    const resp = await fetch("/api/sessions/" + encodeURIComponent(id) + "/envelopes/" + index + "?format=proto", { headers: authHeaders() });
    const url = URL.createObjectURL(await resp.blob());
    const a = el("a", { href: url, download: id + "-" + index + ".pb" });
    document.body.append(a); a.click(); a.remove(); URL.revokeObjectURL(url);
  });
  const dialog = el("dialog", { "aria-labelledby": "raw-title" }, el("h2", { id: "raw-title", text: "Raw log entry " + index }),
    el("pre", { id: "raw-json", text: json(data) }), el("p", {}, download, " ", close));
  close.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  close.focus();
}

// --- Modes and policies --------------------------------------------------------------------------

function modesPage() {
  const cards = el("div", { class: "cards" });
  show(heading("Modes"), el("p", { class: "muted", text: "Every registered mode, with the documentation `macp-runtime docs` generates from its spec." }), cards);
  liveView("", {
    async snapshot() {
      const d = await api("/api/modes");
      cards.replaceChildren(...d.modes.map(m => el("article", { class: "card" },
        el("h2", {}, el("a", { href: "#/modes/" + encodeURIComponent(m.name), text: m.title || m.name })),
        el("p", { class: "mono", text: m.name + " " + m.version }),
        el("p", { class: "muted", text: (m.standards_track ? "standards-track" : "extension") + " · phases: " + m.phases.join(" → ") }),
        el("p", { text: m.description }))));
    },
    event(type) { if (type === "modes") this.snapshot(); },
    fail(err) { cards.replaceChildren(el("p", { class: "error-box", text: err.message })); },
  });
}

function modePage(name) {
  const doc = el("div", { class: "doc" });
  show(el("p", {}, el("a", { href: "#/modes", text: "← all modes" })), heading(name), doc);
  liveView("", {
    async snapshot() {
      const d = await api("/api/modes/" + encodeURIComponent(name));
      doc.innerHTML = d.html;   // rendered by the server from the generated Markdown with raw HTML disabled
      const fig = doc.querySelector("figure.diagram");
      if (fig) {
        fig.append(el("figcaption", {}, el("p", { text: "Phases: " + d.graph.phases.join(", ") + ". Initial: " + d.graph.initial + "." }),
          el("ol", {}, d.legend.map(e => el("li", { value: e.n }, e.from + " → " + e.to + ": " + e.label)))));
      }
    },
    event(type) { if (type === "modes") this.snapshot(); },
    fail(err) { doc.replaceChildren(el("p", { class: "error-box", text: err.status === 404 ? "No such mode." : err.message })); },
  });
}

function policiesPage() {
  const tbody = el("tbody");
  show(heading("Policies"), el("p", { class: "muted", text: "Registered governance policies and their rules (live: registrations appear as they happen)." }),
       el("table", { id: "policies" }, el("thead", {}, el("tr", {}, ["Policy", "Mode", "Schema", "Description", "Rules"].map(h => el("th", { scope: "col", text: h })))), tbody));
  liveView("", {
    async snapshot() {
      const d = await api("/api/policies");
      tbody.replaceChildren(...d.policies.map(p => el("tr", {},
        el("td", { class: "mono", text: p.policy_id }), el("td", { class: "mono", text: p.mode }), el("td", { text: String(p.schema_version) }),
        el("td", { text: p.description }), el("td", {}, el("details", {}, el("summary", { text: "rules" }), el("pre", { text: json(p.rules) }))))));
    },
    event(type) { if (type === "policies") this.snapshot(); },
    fail(err) { tbody.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "error-box", text: err.message }))); },
  });
}

document.getElementById("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
