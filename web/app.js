"use strict";
// Minimal chat client: REST for auth/history/personas/feedback, one websocket for sending and streaming.

const $ = (id) => document.getElementById(id);
const state = {
  token: null,          // bearer token from login; after a reload we rely on the cookie alone
  userId: null,         // from /api/me: decides which personas this user may edit
  personas: new Map(),  // id -> persona (list entry, or the fuller detail once we have it)
  details: new Map(),   // id -> Promise of GET /api/personas/{id}, so each is fetched once
  conversations: [],
  current: null,        // open conversation object, or null
  busy: null,           // {clientId, userEl, replyId} while a send is in flight
  replies: new Map(),   // reply_id -> bubble element of a reply still streaming in this chat
  stopping: null,       // reply_id we asked the server to stop, until its final frame arrives
  limitUntil: 0,        // ms timestamp: sending is rate limited until then
  limitTimer: null,
  ws: null, backoff: 500, loggedIn: false, wasOpen: false,
};

// ---------- helpers ----------
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    // A 401 outside the auth endpoints means the session expired: back to the login card.
    if (res.status === 401 && state.loggedIn && !path.startsWith("/api/auth/")) showAuth();
    const err = new Error(detailOf(data) || `Request failed (${res.status})`);
    err.status = res.status;
    err.code = data && data.code;
    throw err;
  }
  return data;
}

// Domain errors are {"code","detail"}; Litestar validation errors carry a generic detail
// plus an "extra" list naming the bad fields, which is the useful part for a form.
function detailOf(data) {
  if (!data || !data.detail) return "";
  let msg = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  if (Array.isArray(data.extra) && data.extra.length) {
    msg += ": " + data.extra.map((x) => (x.key ? `${x.key}: ${x.message}` : x.message || JSON.stringify(x))).join("; ");
  }
  return msg;
}

function showBanner(msg) {
  $("banner-text").textContent = msg;
  $("banner").hidden = false;
}
$("banner-close").onclick = () => { $("banner").hidden = true; };

const thread = $("thread");
function nearBottom() { return thread.scrollHeight - thread.scrollTop - thread.clientHeight < 80; }
function scrollDown() { thread.scrollTop = thread.scrollHeight; }

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text != null) e.textContent = text;  // never innerHTML: text comes from users and the model
  return e;
}

const sameId = (a, b) => a != null && String(a) === String(b);

// ---------- personas: lookup and display ----------
function personaOf(id) {
  return state.personas.get(String(id)) || { id, name: "Assistant", avatar: "" };
}

// The avatar is free text (max 500 chars): show at most 3 characters (grapheme-aware, so
// emoji with modifiers stay whole), falling back to the name's first letter.
const segmenter = typeof Intl !== "undefined" && Intl.Segmenter ? new Intl.Segmenter() : null;
function avatarText(p) {
  const raw = (p.avatar || "").trim() || (p.name || "?").trim().charAt(0).toUpperCase() || "?";
  const parts = segmenter ? Array.from(segmenter.segment(raw), (s) => s.segment) : Array.from(raw);
  return parts.slice(0, 3).join("");
}
function avatarEl(p, extra) {
  const a = el("span", `avatar${extra ? " " + extra : ""}`, avatarText(p));
  a.title = p.name || "";
  a.setAttribute("aria-hidden", "true");
  return a;
}

// Details (starters, system prompt…) are only in GET /api/personas/{id}; cache the promise.
function personaDetail(id, fresh) {
  const key = String(id);
  if (fresh || !state.details.has(key)) {
    const p = api("GET", `/api/personas/${id}`);
    p.catch(() => state.details.delete(key));  // don't cache failures
    state.details.set(key, p);
  }
  return state.details.get(key);
}

function isMine(p) { return !!p && p.owner_id != null && sameId(p.owner_id, state.userId); }

function renderPersonaPicker(selectId) {
  const sel = $("persona");
  const keep = selectId != null ? String(selectId) : sel.value;
  sel.replaceChildren(...[...state.personas.values()].map((p) => {
    // <option> holds plain text only, so the avatar goes in front of the name.
    const o = el("option", null, `${avatarText(p)}  ${p.name}`);
    o.value = p.id; o.title = p.description || "";
    return o;
  }));
  if (state.personas.has(keep)) sel.value = keep;
  renderPersonaCard();
}

// The card under the picker: who is selected, its version, and whether you can edit it.
function renderPersonaCard() {
  const p = state.personas.get($("persona").value);
  $("persona-card").hidden = !p;
  $("persona-edit").hidden = !isMine(p);
  if (!p) return;
  $("pc-avatar").textContent = avatarText(p);
  $("pc-name").textContent = p.name;
  $("pc-meta").textContent = `v${p.version}${p.visibility === "private" ? " · private" : ""}`;
  $("pc-desc").textContent = p.description || "";
}

// ---------- thread rendering ----------
function bubble(role, text, status) {
  const m = el("div", `msg ${role}`, text || "");
  if (status === "pending" || status === "failed") m.classList.add(status);
  thread.appendChild(m);
  return m;
}

// An assistant turn: persona name and avatar, the bubble, and a footer for notes and
// feedback. Returns the bubble, so streaming code can keep writing textContent into it.
function assistantBubble(text, status, personaId, parent = thread) {
  const p = personaOf(personaId);
  const turn = el("div", "turn");
  const who = el("div", "who");
  who.append(avatarEl(p), el("span", null, p.name));
  const m = el("div", "msg assistant", text || "");
  if (status === "pending" || status === "failed") m.classList.add(status);
  turn.append(who, m, el("div", "meta"));
  parent.appendChild(turn);
  return m;
}

// Fill a finished reply's footer: a "stopped" note for cancelled replies, and feedback
// buttons for everything that produced an answer.
function finishTurn(m, conversationId, replyId, finishReason, feedback) {
  const meta = m.parentElement.querySelector(".meta");
  if (!meta) return;
  meta.replaceChildren();
  if (finishReason === "cancelled") meta.appendChild(el("span", "note", "stopped"));
  if (finishReason !== "error" && !m.classList.contains("failed")) {
    meta.appendChild(feedbackButtons(conversationId, replyId, feedback));
  }
}

function feedbackButtons(conversationId, replyId, initial) {
  const box = el("span", "feedback");
  const up = el("button", "fb", "👍"), down = el("button", "fb", "👎");
  up.type = down.type = "button";
  up.title = "Good reply"; down.title = "Bad reply";
  up.setAttribute("aria-label", "Good reply"); down.setAttribute("aria-label", "Bad reply");
  const mark = (rating) => {
    up.setAttribute("aria-pressed", String(rating === "up"));
    down.setAttribute("aria-pressed", String(rating === "down"));
  };
  mark(initial);
  const send = async (rating, comment = "") => {
    up.disabled = down.disabled = true;
    try {
      await api("POST", `/api/conversations/${conversationId}/messages/${replyId}/feedback`, { rating, comment });
      mark(rating);
      return true;
    } catch (e) {
      showBanner(`Could not save feedback: ${e.message}`);
      return false;
    } finally {
      up.disabled = down.disabled = false;
    }
  };
  up.onclick = () => { closeComment(box); send("up"); };
  // 👎 is recorded at once; the comment box is optional and re-sends the rating with text.
  down.onclick = async () => { if (await send("down")) openComment(box, send); };
  box.append(up, down);
  return box;
}

function closeComment(box) { box.closest(".turn")?.querySelector(".fb-comment")?.remove(); }

function openComment(box, send) {
  const turn = box.closest(".turn");
  if (turn.querySelector(".fb-comment")) { turn.querySelector(".fb-comment input").focus(); return; }
  const form = el("form", "fb-comment");
  const inp = el("input");
  inp.maxLength = 1000;
  inp.placeholder = "What was wrong? (optional)";
  inp.setAttribute("aria-label", "Feedback comment");
  const ok = el("button", "small-btn primary", "Send"), skip = el("button", "small-btn", "Skip");
  ok.type = "submit"; skip.type = "button";
  form.append(inp, ok, skip);
  skip.onclick = () => form.remove();
  form.onsubmit = async (e) => {
    e.preventDefault();
    const comment = inp.value.trim();
    if (!comment) { form.remove(); return; }
    ok.disabled = true;
    if (await send("down", comment)) {
      form.replaceWith(el("div", "note fb-thanks", "Thanks for the feedback."));
    } else ok.disabled = false;
  };
  inp.addEventListener("keydown", (e) => { if (e.key === "Escape") form.remove(); });
  turn.appendChild(form);
  inp.focus();
}

// Empty chat: the persona's greeting, then its conversation starters as chips. Starters
// are only in the persona detail, so they are added when that request comes back.
function renderIntro(personaId) {
  const p = personaOf(personaId);
  const intro = el("div", "intro");
  intro.dataset.persona = String(personaId);
  const hero = el("div", "hero");
  hero.append(avatarEl(p, "big"), el("div", "hero-name", p.name));
  if (p.description) hero.appendChild(el("div", "muted small", p.description));
  intro.appendChild(hero);
  if (p.greeting) assistantBubble(p.greeting, null, personaId, intro).classList.add("greeting");
  thread.appendChild(intro);
  if (personaId == null) return;
  personaDetail(personaId).then((d) => {
    if (!intro.isConnected || !d.starters || !d.starters.length) return;  // chat moved on
    const chips = el("div", "starters");
    for (const s of d.starters) {
      const chip = el("button", "chip", s);
      chip.type = "button";
      chip.onclick = () => { input.value = s; $("composer").requestSubmit(); };
      chips.appendChild(chip);
    }
    intro.appendChild(chips);
  }).catch(() => { /* no starters then; the greeting is already shown */ });
}

// ---------- send / stop button ----------
// The reply the Stop button would stop: ours, or one already streaming in this chat
// (opened from history or started in another tab). The server allows one at a time.
function activeReplyId() {
  if (state.busy && state.busy.replyId) return state.busy.replyId;
  let last = null;
  for (const id of state.replies.keys()) last = id;
  return last;
}

function setSendEnabled() {
  const btn = $("send");
  const streaming = activeReplyId();
  btn.classList.toggle("stop", !!streaming);
  if (streaming) {
    btn.textContent = state.stopping ? "Stopping…" : "Stop";
    btn.disabled = !!state.stopping;
    btn.title = "Stop generating";
  } else {
    btn.textContent = "Send";
    btn.disabled = !!state.busy || Date.now() < state.limitUntil;
    btn.title = "";
  }
}

// ---------- auth ----------
function showAuth() {
  state.loggedIn = false;
  state.wasOpen = false;
  state.token = null;
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(); }
  if ($("persona-dialog").open) $("persona-dialog").close();
  $("app").hidden = true;
  $("auth").hidden = false;
  $("email").focus();
}

async function doAuth(register) {
  const email = $("email").value.trim(), password = $("password").value;
  $("auth-error").textContent = "";
  if (!email || !password) { $("auth-error").textContent = "Email and password are required."; return; }
  $("login-btn").disabled = $("register-btn").disabled = true;
  try {
    if (register) await api("POST", "/api/auth/register", { email, password });
    const { token } = await api("POST", "/api/auth/login", { email, password });
    state.token = token;
    $("password").value = "";
    await startApp(await api("GET", "/api/me"));
  } catch (e) {
    if (state.loggedIn) { showBanner(e.message); return; }  // logged in, later load failed
    $("auth-error").textContent = e.status === 401 ? "Wrong email or password." : e.message;
  } finally {
    $("login-btn").disabled = $("register-btn").disabled = false;
  }
}
$("auth-form").onsubmit = (e) => { e.preventDefault(); doAuth(false); };
$("register-btn").onclick = () => doAuth(true);

$("logout").onclick = async () => {
  try { await api("POST", "/api/auth/logout"); } catch (_) { /* cookie may already be gone */ }
  showAuth();
};

// ---------- app ----------
async function startApp(me) {
  state.loggedIn = true;
  state.userId = me.user_id;
  state.details.clear();  // another user may see other private personas
  $("me").textContent = me.email;
  $("auth").hidden = true;
  $("app").hidden = false;
  connect();
  const personas = await api("GET", "/api/personas");
  state.personas = new Map(personas.map((p) => [String(p.id), p]));  // select values are strings
  renderPersonaPicker();
  await loadConversations();
  if (state.conversations.length) await openConversation(state.conversations[0]);
  else showEmptyChat();
}

async function loadConversations() {
  state.conversations = await api("GET", "/api/conversations");
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title || "Untitled chat";
    li.title = li.textContent;
    li.dataset.id = c.id;
    if (state.current && sameId(c.id, state.current.id)) li.classList.add("active");
    li.onclick = () => { $("sidebar").classList.remove("open"); openConversation(c).catch((e) => showBanner(e.message)); };
    return li;
  }));
  // The server may have renamed the open chat (e.g. titled it after the first message).
  const cur = state.current && state.conversations.find((c) => sameId(c.id, state.current.id));
  if (cur) $("chat-title").textContent = cur.title || "Untitled chat";
}

// Send the persona id with its original JSON type (int or string), not the <select> string.
function selectedPersonaId() {
  const p = state.personas.get($("persona").value);
  return p ? p.id : undefined;
}

// Shown before any conversation exists: the greeting follows the persona picker.
function showEmptyChat() {
  state.current = null;
  state.replies.clear();
  state.stopping = null;
  $("chat-title").textContent = "New chat";
  for (const li of $("conversations").children) li.classList.remove("active");
  thread.replaceChildren();
  renderIntro(selectedPersonaId());
  setSendEnabled();
  $("input").focus();
}
$("persona").onchange = () => { renderPersonaCard(); if (!state.current) showEmptyChat(); };

async function openConversation(conv) {
  state.current = conv;
  state.busy = null;
  state.stopping = null;
  state.replies.clear();
  $("chat-title").textContent = conv.title || "Untitled chat";
  for (const li of $("conversations").children) li.classList.toggle("active", sameId(li.dataset.id, conv.id));
  const msgs = await api("GET", `/api/conversations/${conv.id}/messages`);
  if (state.current !== conv) return;  // user clicked elsewhere while loading
  thread.replaceChildren();
  if (!msgs.length) renderIntro(conv.persona_id);
  for (const m of msgs) {
    if (m.role !== "assistant") { bubble(m.role, m.text); continue; }
    const b = assistantBubble(m.text, m.status, conv.persona_id);
    // Assume the assistant message id equals the reply_id used by the socket, so a
    // reply still generating keeps streaming into this bubble.
    if (m.status === "pending") state.replies.set(String(m.id), b);
    else finishTurn(b, conv.id, m.id, m.finish_reason, m.feedback);
  }
  setSendEnabled();
  scrollDown();
}

$("new-chat").onclick = async () => {
  $("sidebar").classList.remove("open");
  try {
    const conv = await api("POST", "/api/conversations", { persona_id: selectedPersonaId() });
    await openConversation(conv);
    await loadConversations();
  } catch (e) { showBanner(e.message); }
};
$("menu").onclick = (e) => { e.stopPropagation(); $("sidebar").classList.toggle("open"); };
// On narrow screens the sidebar is a drawer: tapping the chat closes it.
document.querySelector(".chat").addEventListener("click", () => $("sidebar").classList.remove("open"));

// ---------- composer ----------
const input = $("input");
function fitInput() {  // grow with content up to the CSS max-height
  input.style.height = "auto";
  input.style.height = input.scrollHeight + "px";
}
input.addEventListener("input", fitInput);
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

// While a reply streams the button is "Stop". Handle that on click rather than in onsubmit,
// so pressing Enter in the textarea never stops a reply by accident.
$("send").addEventListener("click", (e) => {
  const replyId = activeReplyId();
  if (!replyId) return;  // a normal submit
  e.preventDefault();
  if (state.stopping || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  state.stopping = replyId;
  state.ws.send(JSON.stringify({ type: "stop", reply_id: replyId }));
  setSendEnabled();
});

$("composer").onsubmit = async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || state.busy || activeReplyId() || Date.now() < state.limitUntil) return;
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    showBanner("Not connected to the server yet, reconnecting…");
    return;
  }
  const clientId = crypto.randomUUID();
  state.busy = { clientId, userEl: null, replyId: null };
  setSendEnabled();
  try {
    if (!state.current) {  // first message of a fresh chat creates the conversation
      const conv = await api("POST", "/api/conversations", { persona_id: selectedPersonaId() });
      await openConversation(conv);
      loadConversations().catch(() => {});
      state.busy = { clientId, userEl: null, replyId: null };  // openConversation reset it
      setSendEnabled();
    }
    thread.querySelector(".intro")?.remove();
    state.busy.userEl = bubble("user", text);
    scrollDown();
    state.ws.send(JSON.stringify({ type: "send", conversation_id: state.current.id, client_message_id: clientId, text }));
    input.value = "";
    fitInput();
  } catch (err) {
    state.busy = null;
    setSendEnabled();
    showBanner(err.message);
  }
};

// ---------- rate limits ----------
function formatWait(s) {
  if (s < 60) return `${s}s`;
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

// Show the server's message with a countdown; Send stays disabled until it runs out.
function startRateLimit(message, retryAfter) {
  state.limitUntil = Date.now() + Math.max(1, Number(retryAfter) || 1) * 1000;
  // Server messages are lower-case fragments ("at most 30 messages a minute; …"): tidy them.
  const msg = (message || "too many messages").replace(/^./, (c) => c.toUpperCase());
  $("limit-text").textContent = /[.!?]$/.test(msg) ? msg : msg + ".";
  $("limit").hidden = false;
  clearInterval(state.limitTimer);
  const tick = () => {
    const left = Math.ceil((state.limitUntil - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(state.limitTimer);
      $("limit").hidden = true;
      setSendEnabled();
      return;
    }
    $("limit-count").textContent = `Wait ${formatWait(left)}.`;
  };
  tick();
  state.limitTimer = setInterval(tick, 1000);
  setSendEnabled();
}

// ---------- websocket ----------
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/api/ws`);
  state.ws = ws;
  ws.onopen = () => {
    state.backoff = 500;
    $("conn").classList.add("online");
    $("conn").title = "Connected";
    // After a reconnect, replies that finished while we were offline are in the history.
    if (state.wasOpen && state.current) openConversation(state.current).catch(() => {});
    state.wasOpen = true;
  };
  ws.onmessage = (ev) => {
    let f;
    try { f = JSON.parse(ev.data); } catch (_) { return; }  // ignore non-JSON frames
    handleFrame(f);
  };
  ws.onclose = () => {
    $("conn").classList.remove("online");
    $("conn").title = "Disconnected, reconnecting…";
    if (state.ws !== ws) return;  // closed on purpose (logout)
    // The in-flight send can no longer be acknowledged on this socket; unlock the composer.
    state.busy = null;
    state.stopping = null;
    setSendEnabled();
    setTimeout(() => { if (state.loggedIn && state.ws === ws) connect(); }, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 15000);
  };
}

function handleFrame(f) {
  const here = state.current && sameId(f.conversation_id, state.current.id);
  const stick = nearBottom();
  if (f.type === "error") {
    // An error before "accepted" means our send was rejected: give the text back and unlock.
    const ours = state.busy && !state.busy.replyId &&
      (f.client_message_id == null || f.client_message_id === state.busy.clientId);
    if (f.code === "rate_limited") {
      startRateLimit(f.message, f.retry_after);
      if (ours) {
        // Nothing was posted: drop the bubble and put the text back for after the countdown.
        const userEl = state.busy.userEl;
        if (userEl && !input.value) { input.value = userEl.textContent; fitInput(); }
        userEl?.remove();
        state.busy = null;
      }
    } else {
      showBanner(f.message || f.code || "Something went wrong");
      if (ours) {
        const userEl = state.busy.userEl;
        userEl?.classList.add("failed");
        if (userEl && !input.value) { input.value = userEl.textContent; fitInput(); }
        state.busy = null;
      }
    }
    if (f.reply_id && sameId(state.stopping, f.reply_id)) state.stopping = null;  // stop was refused
    setSendEnabled();
  } else if (f.type === "accepted" && here) {
    if (!state.busy || state.busy.clientId !== f.client_message_id) return;
    state.busy.replyId = f.reply_id;
    state.replies.set(String(f.reply_id), assistantBubble("", "pending", state.current.persona_id));
    setSendEnabled();
  } else if (f.type === "token" && here) {
    let b = state.replies.get(String(f.reply_id));
    if (!b) {  // a reply started elsewhere (another tab): show it too
      b = assistantBubble("", "pending", state.current.persona_id);
      state.replies.set(String(f.reply_id), b);
      setSendEnabled();
    }
    b.textContent += f.text;
  } else if (f.type === "reply") {
    if (here) {
      // Unknown reply_id: already rendered from history (e.g. after a reconnect); skip it.
      const b = state.replies.get(String(f.reply_id));
      if (b) {
        b.textContent = f.text;  // final text is authoritative; replaces the streamed deltas
        b.classList.remove("pending");
        if (f.finish_reason === "error") b.classList.add("failed");
        finishTurn(b, f.conversation_id, f.reply_id, f.finish_reason, null);
        state.replies.delete(String(f.reply_id));
      }
    }
    if (state.busy && sameId(state.busy.replyId, f.reply_id)) state.busy = null;
    if (sameId(state.stopping, f.reply_id)) state.stopping = null;
    setSendEnabled();
    loadConversations().catch(() => {});  // titles and ordering may have changed
  }
  if (here && stick) scrollDown();
}

// ---------- persona editor ----------
const dialog = $("persona-dialog"), pform = $("persona-form");
let editing = null;  // the persona detail being edited, or null when creating
let slugTouched = false;

const field = (name) => pform.elements.namedItem(name);
const TEXT_FIELDS = ["name", "avatar", "description", "system_prompt", "greeting"];

function slugify(name) {
  return name.toLowerCase().normalize("NFKD").replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 48);
}

// What the form says, in the API's shape (numbers as numbers, starters as a list).
function formValues() {
  const v = {};
  for (const k of TEXT_FIELDS) v[k] = field(k).value.trim();
  v.starters = field("starters").value.split("\n").map((s) => s.trim()).filter(Boolean);
  v.temperature = Number(field("temperature").value);
  v.top_p = Number(field("top_p").value);
  v.max_tokens = parseInt(field("max_tokens").value, 10);
  v.visibility = field("visibility").value;
  return v;
}

function openPersonaEditor(detail) {
  editing = detail || null;
  slugTouched = !!detail;
  pform.reset();
  const d = detail || { temperature: 0.8, top_p: 0.95, max_tokens: 96, visibility: "private", starters: [] };
  for (const k of TEXT_FIELDS) field(k).value = d[k] || "";
  field("slug").value = d.slug || "";
  field("slug").disabled = !!detail;  // the slug is the persona's identity: fixed once created
  $("pf-slug-label").hidden = !!detail;
  field("starters").value = (d.starters || []).join("\n");
  field("temperature").value = d.temperature;
  field("top_p").value = d.top_p;
  field("max_tokens").value = d.max_tokens;
  field("visibility").value = d.visibility || "private";
  $("pf-title").textContent = detail ? `Edit ${detail.name}` : "New persona";
  $("pf-version").hidden = !detail;
  $("pf-version").textContent = detail ? `v${detail.version}` : "";
  $("pf-save").textContent = detail ? "Save" : "Create";
  $("pf-retire").hidden = !detail;
  $("pf-retire").textContent = "Retire";
  delete $("pf-retire").dataset.confirm;
  $("pf-error").textContent = "";
  dialog.showModal();
  field("name").focus();
}

$("persona-new").onclick = () => openPersonaEditor(null);
$("persona-edit").onclick = async () => {
  const id = $("persona").value;
  try { openPersonaEditor(await personaDetail(id, true)); }  // fresh: the version may have moved
  catch (e) { showBanner(e.message); }
};
$("pf-close").onclick = $("pf-cancel").onclick = () => dialog.close();

// Until the user types a slug, derive it from the name.
field("name").addEventListener("input", () => { if (!editing && !slugTouched) field("slug").value = slugify(field("name").value); });
field("slug").addEventListener("input", () => { slugTouched = true; });

// A saved persona replaces our copy at once: the persona list is a projection that may
// lag the write by a moment, so re-fetching it right away could still show the old one.
function rememberPersona(detail) {
  const key = String(detail.id);
  state.personas.set(key, detail);
  state.details.set(key, Promise.resolve(detail));
}

pform.onsubmit = async (e) => {
  e.preventDefault();
  $("pf-error").textContent = "";
  const v = formValues();
  if (v.starters.length > 6) { $("pf-error").textContent = "At most 6 conversation starters."; return; }
  let body;
  if (editing) {
    // PATCH only what changed: every PATCH makes a new version.
    body = {};
    for (const [k, val] of Object.entries(v)) {
      if (JSON.stringify(val) !== JSON.stringify(editing[k])) body[k] = val;
    }
    if (!Object.keys(body).length) { dialog.close(); return; }
  } else {
    body = { slug: field("slug").value.trim(), ...v };
  }
  $("pf-save").disabled = true;
  try {
    const detail = editing
      ? await api("PATCH", `/api/personas/${editing.id}`, body)
      : await api("POST", "/api/personas", body);
    rememberPersona(detail);
    renderPersonaPicker(detail.id);
    dialog.close();
    // A new persona opens a fresh chat with it, so its greeting and starters show right away.
    if (!editing || !state.current) showEmptyChat();
    // Re-render so bubbles show the new name and avatar, unless that would cut into a reply.
    else if (!state.busy && !activeReplyId()) openConversation(state.current).catch(() => {});
  } catch (err) {
    $("pf-error").textContent = err.message;  // 400 invalid, 403 not owner, 409 slug taken
  } finally {
    $("pf-save").disabled = false;
  }
};

// Retiring asks twice (the button turns into a confirmation) rather than a browser dialog.
$("pf-retire").onclick = async () => {
  const btn = $("pf-retire");
  if (!btn.dataset.confirm) {
    btn.dataset.confirm = "1";
    btn.textContent = "Really retire?";
    return;
  }
  btn.disabled = true;
  try {
    await api("DELETE", `/api/personas/${editing.id}`);
    state.personas.delete(String(editing.id));
    state.details.delete(String(editing.id));
    dialog.close();
    renderPersonaPicker();
    if (!state.current) showEmptyChat();
  } catch (err) {
    $("pf-error").textContent = err.message;
  } finally {
    btn.disabled = false;
  }
};

// ---------- boot ----------
(async () => {
  let me;
  try { me = await api("GET", "/api/me"); } catch (_) { showAuth(); return; }
  try { await startApp(me); } catch (e) { if (state.loggedIn) showBanner(e.message); }
})();
