"use strict";
// The chat page's one script: the websocket stream (/api/ws) and the chat forms that need it.
//
// Send, regenerate and edit become websocket frames; the reply streams into its bubble as
// plain text (textContent only: nothing a model writes is ever parsed as HTML here). When
// it ends, the page is fetched again and its thread, title and chat list are swapped in:
// the server renders stored text as sanitised Markdown, in one place. Without a socket
// (or without this script) every form posts to its page route instead.
(() => {
  const chat = document.getElementById("chat");
  if (!chat) return;
  const cid = chat.dataset.conversationId;
  const $ = (id) => document.getElementById(id);
  const input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), conn = $("conn"), limitNote = $("limit");

  const state = {
    ws: null, open: false, everOpen: false, backoff: 500,
    inflight: null,   // {kind, clientId?, text?, userEl?}: a frame sent, its `accepted` not yet here
    replyId: null,    // the reply being written in this chat
    stopping: false,  // a stop was sent for replyId
    finished: new Set(),  // replies whose final frame came: never pending again
    limitUntil: 0, limitTimer: null,
    title: null,      // the title the model wrote, from its frame: kept over a page fetched before it
  };

  // ---------- helpers ----------
  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text != null) e.textContent = text;
    return e;
  }

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));  // http on a LAN host: no randomUUID
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function thread() { return $("thread"); }
  function nearBottom() { const t = thread(); return t.scrollHeight - t.scrollTop - t.clientHeight < 80; }
  function scrollDown() { const t = thread(); t.scrollTop = t.scrollHeight; }

  function notify(message) {  // the page's flash (base.html), made if the page had none
    let box = $("flash"), dismissed = $("flash-dismissed");
    if (!box) {
      dismissed = el("input", "flash-dismissed");
      Object.assign(dismissed, { type: "checkbox", id: "flash-dismissed", hidden: true });
      box = el("div", "flash error");
      box.id = "flash";
      box.setAttribute("role", "alert");
      const close = el("label", "dismiss", "×");
      close.htmlFor = "flash-dismissed";
      close.title = "Dismiss";
      close.setAttribute("aria-label", "Dismiss");
      box.append(el("span", "flash-text"), close);
      document.body.prepend(dismissed, box);
    }
    box.className = "flash error";
    box.querySelector(".flash-text").textContent = message;
    dismissed.checked = false;  // shown again, even if an earlier one was dismissed
    box.hidden = false;
  }

  function setBusy() {
    const streaming = !!state.replyId;
    chat.classList.toggle("busy", streaming || !!state.inflight);
    sendBtn.hidden = streaming;
    stopBtn.hidden = !streaming;
    stopBtn.disabled = state.stopping;
    stopBtn.textContent = state.stopping ? "Stopping…" : "Stop";
    sendBtn.disabled = !!state.inflight || Date.now() < state.limitUntil || tooLong();
  }

  function turn(role) {
    const t = el("article", `turn ${role}`);
    t.dataset.role = role;
    return t;
  }

  function userBubble(text) {
    const t = turn("user");
    t.appendChild(el("div", "msg user", text));
    thread().appendChild(t);
    return t;
  }

  // The bubble a reply streams into: found by its id, or made at the end of the thread.
  function replyBubble(replyId) {
    const found = thread().querySelector(`.msg[data-reply-id="${CSS.escape(replyId)}"]`);
    if (found) return found;
    const t = turn("assistant");
    t.id = `m-${replyId}`;
    t.dataset.status = "pending";
    const who = thread().querySelector(".intro .hero");
    const header = el("div", "who");
    const avatar = who && who.querySelector(".avatar"), name = who && who.querySelector(".hero-name");
    header.append(el("span", "avatar", avatar ? avatar.textContent : ""), el("span", null, name ? name.textContent : ""));
    const m = el("div", "msg assistant pending");
    m.dataset.replyId = replyId;
    t.append(header, m, el("div", "meta"));
    thread().appendChild(t);
    return m;
  }

  // Everything from `article` on leaves the thread: a regenerated reply or an edited
  // message replaces that part of the branch.
  function cutFrom(article) {
    while (article.nextElementSibling) article.nextElementSibling.remove();
    article.remove();
  }

  function dropStarters() { thread().querySelector(".starters")?.remove(); }

  // ---------- copy ----------
  // A Copy button on each code block and on each finished message (a page without this
  // script has none: it would have nothing to copy with).
  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = el("textarea");  // plain http on a LAN host: the older way
    area.value = text;
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    if (!done) throw new Error("copy refused");
  }

  function copyButton(label, text) {
    const button = el("button", "copy-btn small-btn", "Copy");
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", async () => {
      try {
        await copyText(text());
        button.textContent = "Copied";
      } catch (_) {
        button.textContent = "Could not copy";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    return button;
  }

  function visibleText(node) {  // its text as shown, without the Copy buttons inside it
    const copy = node.cloneNode(true);
    copy.querySelectorAll(".copy-btn").forEach((b) => b.remove());
    Object.assign(copy.style, { position: "absolute", left: "-10000px" });
    document.body.append(copy);  // innerText needs it laid out
    const text = copy.innerText;
    copy.remove();
    return text;
  }

  function addCopyButtons() {
    for (const pre of thread().querySelectorAll(".msg.markdown pre")) {
      if (pre.querySelector(".copy-btn")) continue;
      const code = pre.querySelector("code") || pre;
      pre.append(copyButton("Copy code", () => code.innerText));
    }
    for (const turn of thread().querySelectorAll('.turn[data-status="complete"]')) {
      const meta = turn.querySelector(".meta"), msg = turn.querySelector(".msg");
      if (!meta || !msg || meta.querySelector(".copy-btn")) continue;
      meta.prepend(copyButton("Copy message", () => visibleText(msg)));
    }
  }

  // ---------- the page, fetched again ----------
  let refreshing = null;
  async function refresh(attempt = 0) {
    if (refreshing) return refreshing;
    refreshing = (async () => {
      try {
        const res = await fetch(`/c/${encodeURIComponent(cid)}?settle=1`, { credentials: "same-origin" });
        if (res.redirected && new URL(res.url).pathname === "/login") { location.assign(res.url); return; }
        if (!res.ok) return;
        const doc = new DOMParser().parseFromString(await res.text(), "text/html");
        const stick = nearBottom();
        for (const id of ["thread", "chat-title", "conversations"]) {
          const fresh = doc.getElementById(id), here = $(id);
          if (fresh && here) here.replaceWith(document.adoptNode(fresh));
        }
        if (state.title) showTitle(state.title);
        addCopyButtons();
        const pending = thread().querySelector('.turn[data-status="pending"]');
        const id = pending ? pending.dataset.messageId : null;
        if (id && state.finished.has(id)) {
          // the server's pages lag the reply we saw end (its read models are behind): ask again
          if (attempt < 10) setTimeout(() => refresh(attempt + 1), 500);
          state.replyId = null;
        } else {
          state.replyId = id;
        }
        if (!state.replyId) state.stopping = false;
        setBusy();
        if (stick) scrollDown();
      } catch (_) {
        /* offline: the next reply or reconnect refreshes again */
      } finally {
        refreshing = null;
      }
    })();
    return refreshing;
  }

  // ---------- the socket ----------
  function send(frame) {
    if (!state.open) return false;
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/api/ws`);
    state.ws = ws;
    ws.onopen = async () => {
      state.open = true;
      state.backoff = 500;
      conn.classList.add("online");
      conn.title = "Live";
      if (state.everOpen) await refresh();  // what happened while we were away
      state.everOpen = true;
      // Follow this chat; a reply being written comes back as its text so far, then the rest.
      send({ type: "resume", conversation_id: cid });
    };
    ws.onmessage = (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(frame);
    };
    ws.onclose = () => {
      state.open = false;
      conn.classList.remove("online");
      conn.title = "Reconnecting…";
      if (state.inflight) { state.inflight = null; }  // unknown fate: the refresh on reconnect tells
      setBusy();
      setTimeout(connect, state.backoff);
      state.backoff = Math.min(state.backoff * 2, 15000);
    };
  }

  function onFrame(f) {
    if (f.conversation_id != null && String(f.conversation_id) !== cid) return;  // another chat's
    const stick = nearBottom();
    if (f.type === "resumed") {
      if (f.reply_id) {
        state.replyId = String(f.reply_id);
        replyBubble(state.replyId).textContent = "";  // the text so far comes next, whole
      } else if (state.replyId && !state.inflight) {
        refresh();  // the reply we showed as pending ended while we were away
      }
    } else if (f.type === "accepted") {
      const mine = state.inflight;
      if (!mine) return;
      if (mine.clientId && f.client_message_id && f.client_message_id !== mine.clientId) return;  // another tab's
      state.inflight = null;
      state.replyId = String(f.reply_id);
      replyBubble(state.replyId);
    } else if (f.type === "token") {
      const b = replyBubble(String(f.reply_id));
      if (!state.replyId) state.replyId = String(f.reply_id);  // started in another tab
      b.append(document.createTextNode(f.text));
    } else if (f.type === "reply") {
      const b = replyBubble(String(f.reply_id));
      b.textContent = f.text;  // the final text is authoritative
      b.classList.remove("pending");
      state.finished.add(String(f.reply_id));
      if (String(f.reply_id) === state.replyId) { state.replyId = null; state.stopping = false; }
      refresh();
    } else if (f.type === "title") {
      state.title = f.title;
      showTitle(f.title);
    } else if (f.type === "error") {
      onError(f);
    }
    setBusy();
    if (stick) scrollDown();
  }

  function showTitle(title) {  // the model named the chat: in the header and the chat list
    $("chat-title").textContent = title;
    const link = document.querySelector(`#conversations a[href="/c/${CSS.escape(cid)}"]`);
    if (link) { (link.querySelector(".conv-title") || link).textContent = title; link.title = title; }
  }

  function onError(f) {
    const mine = state.inflight;
    if (f.code === "rate_limited") startRateLimit(f.message, f.retry_after);
    else if (f.code !== "reply_failed" || !f.reply_id) notify(f.message || f.code || "Something went wrong.");
    else notify(`The reply failed: ${f.message || "unknown error"}`);
    if (f.code === "not_found" && f.reply_id) state.stopping = false;  // a stop that found nothing
    if (!mine || f.reply_id) return;
    state.inflight = null;
    if (mine.kind === "send") {
      mine.userEl?.remove();
      if (!input.value) { input.value = mine.text; fit(); }
    } else {
      refresh();  // put back the part of the branch we took away
    }
  }

  // ---------- rate limit ----------
  function formatWait(s) {
    if (s < 60) return `${s}s`;
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = String(s % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
  }

  function startRateLimit(message, retryAfter) {
    state.limitUntil = Date.now() + Math.max(1, Number(retryAfter) || 1) * 1000;
    const text = (message || "too many messages").replace(/^./, (c) => c.toUpperCase());
    clearInterval(state.limitTimer);
    const tick = () => {
      const left = Math.ceil((state.limitUntil - Date.now()) / 1000);
      if (left <= 0) {
        clearInterval(state.limitTimer);
        limitNote.hidden = true;
        setBusy();
        return;
      }
      limitNote.textContent = `${text}${/[.!?]$/.test(text) ? "" : "."} Wait ${formatWait(left)}.`;
    };
    limitNote.hidden = false;
    tick();
    state.limitTimer = setInterval(tick, 1000);
  }

  // ---------- the forms ----------
  function canSend() {
    return state.open && !state.inflight && !state.replyId && Date.now() >= state.limitUntil;
  }

  function sendText(text) {
    const clientId = newId();
    dropStarters();
    const userEl = userBubble(text);
    state.inflight = { kind: "send", clientId, text, userEl };
    send({ type: "send", conversation_id: cid, client_message_id: clientId, text });
    scrollDown();
  }

  document.addEventListener("submit", (e) => {
    const form = e.target;
    if (!(form instanceof HTMLFormElement) || !chat.contains(form)) return;
    if (form.id === "composer") {
      if (!state.open) return;  // no socket: the form posts, the page reloads
      e.preventDefault();
      const text = input.value.trim();
      if (!text || !canSend() || tooLong()) return;
      input.value = "";
      fit();
      sendText(text);
    } else if (form.classList.contains("starters")) {
      if (!state.open) return;
      e.preventDefault();
      const text = e.submitter && e.submitter.value;
      if (text && canSend()) sendText(text);
    } else if (form.classList.contains("regenerate")) {
      if (!state.open) return;
      e.preventDefault();
      if (!canSend()) return;
      const article = form.closest(".turn");
      state.inflight = { kind: "regenerate" };
      cutFrom(article);
      send({ type: "regenerate", conversation_id: cid, message_id: form.dataset.messageId });
    } else if (form.classList.contains("edit-form")) {
      if (!state.open) return;
      e.preventDefault();
      const text = form.elements.namedItem("text").value.trim();
      if (!text || !canSend()) return;
      const clientId = newId();
      cutFrom(form.closest(".turn"));
      state.inflight = { kind: "edit", clientId, text };
      userBubble(text);
      send({ type: "edit", conversation_id: cid, message_id: form.dataset.messageId, text, client_message_id: clientId });
    } else {
      return;
    }
    setBusy();
  });

  // The chat's menu closes with Esc (focus back on its button) and with a click elsewhere.
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    const nav = $("nav-toggle");
    if (nav && nav.checked) nav.checked = false;  // the chat list slid out on a phone
    for (const menu of document.querySelectorAll("details.actions-menu[open]")) {
      menu.open = false;
      menu.querySelector("summary").focus();
    }
  });
  document.addEventListener("click", (e) => {
    for (const menu of document.querySelectorAll("details.actions-menu[open]")) {
      if (!menu.contains(e.target)) menu.open = false;
    }
  });

  stopBtn.addEventListener("click", () => {
    if (!state.replyId || state.stopping) return;
    if (send({ type: "stop", reply_id: state.replyId })) {
      state.stopping = true;
      setBusy();
    }
  });

  function fit() {  // the composer grows with its text, up to the CSS max-height
    input.style.height = "auto";
    input.style.height = `${input.scrollHeight}px`;
    count();
  }
  input.addEventListener("input", fit);

  // Near the limit the composer shows how many characters there are; over it, by how many,
  // and the message cannot be sent (nothing is cut: a paste over the limit stays whole).
  const maxChars = Number(input.dataset.max) || 0, counter = $("count");
  function tooLong() { return maxChars > 0 && [...input.value.trim()].length > maxChars; }
  function count() {
    if (!maxChars) return;
    const n = [...input.value].length;  // characters as the server counts them (code points)
    counter.hidden = n < maxChars * 0.9;
    const over = tooLong();
    counter.classList.toggle("over", over);
    counter.textContent = over
      ? `${n.toLocaleString()} / ${maxChars.toLocaleString()}: ${(n - maxChars).toLocaleString()} too many to send`
      : `${n.toLocaleString()} / ${maxChars.toLocaleString()}`;
    setBusy();
  }
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });

  const pending = thread().querySelector('.turn[data-status="pending"]');
  state.replyId = pending ? pending.dataset.messageId : null;
  addCopyButtons();
  setBusy();
  scrollDown();
  connect();
})();
