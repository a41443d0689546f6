"use strict";
// Minimal chat client: REST for auth/history, one websocket for sending and streaming.

const $ = (id) => document.getElementById(id);
const state = {
  token: null,          // bearer token from login; after a reload we rely on the cookie alone
  personas: new Map(),  // id -> persona
  conversations: [],
  current: null,        // open conversation object, or null
  busy: null,           // {clientId, userEl, replyId} while a send is in flight
  replies: new Map(),   // reply_id -> bubble element, so tokens find their bubble
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
    throw err;
  }
  return data;
}

// Litestar validation errors may carry detail as a string or a list; show something readable.
function detailOf(data) {
  if (!data || !data.detail) return "";
  return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
}

function showBanner(msg) {
  $("banner-text").textContent = msg;
  $("banner").hidden = false;
}
$("banner-close").onclick = () => { $("banner").hidden = true; };

const thread = $("thread");
function nearBottom() { return thread.scrollHeight - thread.scrollTop - thread.clientHeight < 80; }
function scrollDown() { thread.scrollTop = thread.scrollHeight; }

function bubble(role, text, status) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  if (status === "pending" || status === "failed") el.classList.add(status);
  el.textContent = text || "";  // never innerHTML: text comes from users and the model
  thread.appendChild(el);
  return el;
}

function setSendEnabled() { $("send").disabled = !!state.busy; }

// ---------- auth ----------
function showAuth() {
  state.loggedIn = false;
  state.wasOpen = false;
  state.token = null;
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(); }
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
  $("me").textContent = me.email;
  $("auth").hidden = true;
  $("app").hidden = false;
  connect();
  const personas = await api("GET", "/api/personas");
  state.personas = new Map(personas.map((p) => [String(p.id), p]));  // select values are strings
  const sel = $("persona");
  sel.replaceChildren(...personas.map((p) => {
    const o = document.createElement("option");
    o.value = p.id; o.textContent = p.name; o.title = p.description || "";
    return o;
  }));
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

function greetingFor(personaId) {
  const p = state.personas.get(String(personaId));
  return p && p.greeting;
}
// Send the persona id with its original JSON type (int or string), not the <select> string.
function selectedPersonaId() {
  const p = state.personas.get($("persona").value);
  return p ? p.id : undefined;
}
const sameId = (a, b) => a != null && String(a) === String(b);

// Shown before any conversation exists: the greeting follows the persona picker.
function showEmptyChat() {
  state.current = null;
  state.replies.clear();
  $("chat-title").textContent = "New chat";
  thread.replaceChildren();
  const g = greetingFor($("persona").value);
  if (g) bubble("assistant", g).classList.add("greeting");
  $("input").focus();
}
$("persona").onchange = () => { if (!state.current) showEmptyChat(); };

async function openConversation(conv) {
  state.current = conv;
  state.busy = null;
  state.replies.clear();
  $("chat-title").textContent = conv.title || "Untitled chat";
  for (const li of $("conversations").children) li.classList.toggle("active", sameId(li.dataset.id, conv.id));
  const msgs = await api("GET", `/api/conversations/${conv.id}/messages`);
  if (state.current !== conv) return;  // user clicked elsewhere while loading
  thread.replaceChildren();
  if (!msgs.length) {
    const g = greetingFor(conv.persona_id);
    if (g) bubble("assistant", g).classList.add("greeting");
  }
  for (const m of msgs) {
    const el = bubble(m.role, m.text, m.role === "assistant" ? m.status : null);
    // Assume the assistant message id equals the reply_id used by the socket, so a
    // reply still generating keeps streaming into this bubble.
    if (m.role === "assistant" && m.status === "pending") state.replies.set(String(m.id), el);
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
input.addEventListener("input", () => {  // grow with content up to the CSS max-height
  input.style.height = "auto";
  input.style.height = input.scrollHeight + "px";
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("composer").onsubmit = async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || state.busy) return;
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
    thread.querySelector(".greeting")?.remove();
    state.busy.userEl = bubble("user", text);
    scrollDown();
    state.ws.send(JSON.stringify({ type: "send", conversation_id: state.current.id, client_message_id: clientId, text }));
    input.value = "";
    input.style.height = "auto";
  } catch (err) {
    state.busy = null;
    setSendEnabled();
    showBanner(err.message);
  }
};

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
    setSendEnabled();
    setTimeout(() => { if (state.loggedIn && state.ws === ws) connect(); }, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 15000);
  };
}

function handleFrame(f) {
  const here = state.current && sameId(f.conversation_id, state.current.id);
  const stick = nearBottom();
  if (f.type === "error") {
    showBanner(f.message || f.code || "Something went wrong");
    // An error before "accepted" means our send was rejected: mark it and unlock.
    if (state.busy && !state.busy.replyId) {
      const el = state.busy.userEl;
      el?.classList.add("failed");
      if (el && !input.value) input.value = el.textContent;  // give the text back for a retry
      state.busy = null;
      setSendEnabled();
    }
  } else if (f.type === "accepted" && here) {
    if (!state.busy || state.busy.clientId !== f.client_message_id) return;
    state.busy.replyId = f.reply_id;
    state.replies.set(String(f.reply_id), bubble("assistant", "", "pending"));
  } else if (f.type === "token" && here) {
    let el = state.replies.get(String(f.reply_id));
    if (!el) {  // a reply started elsewhere (another tab): show it too
      el = bubble("assistant", "", "pending");
      state.replies.set(String(f.reply_id), el);
    }
    el.textContent += f.text;
  } else if (f.type === "reply") {
    if (here) {
      // Unknown reply_id: already rendered from history (e.g. after a reconnect); skip it.
      const el = state.replies.get(String(f.reply_id));
      if (el) {
        el.textContent = f.text;  // final text is authoritative; replaces the streamed deltas
        el.classList.remove("pending");
        if (f.finish_reason === "error") el.classList.add("failed");
        state.replies.delete(String(f.reply_id));
      }
    }
    if (state.busy && sameId(state.busy.replyId, f.reply_id)) state.busy = null;
    setSendEnabled();
    loadConversations().catch(() => {});  // titles and ordering may have changed
  }
  if (here && stick) scrollDown();
}

// ---------- boot ----------
(async () => {
  let me;
  try { me = await api("GET", "/api/me"); } catch (_) { showAuth(); return; }
  try { await startApp(me); } catch (e) { if (state.loggedIn) showBanner(e.message); }
})();
