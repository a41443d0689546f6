"use strict";
// The one script of the pages (no build step): on every page the copy buttons, the chat
// list's paging and menus, dismissable banners and message-limit notes; on the chat page,
// the websocket stream (/api/ws) and the chat forms that need it.
//
// Send, regenerate and edit become websocket frames; the reply streams into its bubble as
// plain text (textContent only: nothing a model writes is ever parsed as HTML here). When
// it ends, the page is fetched again and its thread, title and chat list are swapped in:
// the server renders stored text as sanitised Markdown, in one place. Without a socket
// (or without this script) every form posts to its page route instead.

// ---------- copy (every page with this script: the chat, the list of share links) ----------
async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http on a LAN host: the older way
  area.value = text;
  document.body.append(area);
  area.select();
  const done = document.execCommand("copy");
  area.remove();
  if (!done) throw new Error("copy refused");
}

async function copyFrom(button, text) {  // the button says how it went, then is "Copy" again
  try {
    await copyText(text);
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Could not copy";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// A button the page renders hidden with its text in `data-copy` (a share link's full URL):
// shown here, as without this script it could copy nothing.
for (const button of document.querySelectorAll("button[data-copy]")) button.hidden = false;
document.addEventListener("click", (e) => {
  const button = e.target instanceof Element ? e.target.closest("button[data-copy]") : null;
  if (button) copyFrom(button, button.dataset.copy);
});

// ---------- the chat list, on every page ----------
// The browser's time zone goes to the server (the `tz` cookie), which groups the list by
// the viewer's dates; "More chats" appends the next page in place, and does so by itself
// when the link scrolls into view. Without the script the link opens that page.
(() => {
  try {
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone && !document.cookie.split("; ").includes("tz=" + encodeURIComponent(zone))) {
      document.cookie = "tz=" + encodeURIComponent(zone) + "; path=/; max-age=31536000; samesite=lax";
    }
  } catch (e) { /* no Intl: the server uses UTC */ }

  let loading = false;
  async function loadMore(link, clicked) {
    if (loading) return;
    loading = true;
    try {
      const response = await fetch(link.href, { credentials: "same-origin", signal: AbortSignal.timeout(15000) });
      if (!response.ok) throw new Error(response.statusText);
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const list = document.getElementById("conversations"), next = page.getElementById("conversations");
      if (!list || !next) throw new Error("no chat list");
      const parts = Array.from(next.children);
      for (let i = 0; i < parts.length; i++) {
        const part = parts[i], last = list.lastElementChild;
        if (part.classList.contains("empty")) continue;
        const heading = last && last.tagName === "UL" ? last.previousElementSibling : null;
        if (part.tagName === "H2" && heading && heading.textContent === part.textContent && parts[i + 1]) {
          last.append(...Array.from(parts[i + 1].children));  // the date group goes on
          i++;
          continue;
        }
        list.append(part);
      }
      const more = page.getElementById("more-chats");
      if (more) link.href = more.getAttribute("href"); else link.remove();
    } catch (e) {
      if (clicked) window.location.href = link.href;  // the plain page still works
    } finally {
      loading = false;
    }
  }

  // A chat's menu in the list: one open at a time, in view when opened; Esc (focus back on
  // its button) or a click elsewhere closes it.
  const openMenus = () => document.querySelectorAll("details.item-menu[open]");
  document.addEventListener("toggle", (e) => {
    const menu = e.target;
    if (!(menu instanceof HTMLDetailsElement) || !menu.classList.contains("item-menu") || !menu.open) return;
    for (const other of openMenus()) if (other !== menu) other.open = false;
    menu.querySelector(".menu-panel").scrollIntoView({ block: "nearest" });
  }, true);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || !openMenus().length) return;
    for (const menu of openMenus()) {
      menu.open = false;
      menu.querySelector("summary").focus();
    }
    e.stopImmediatePropagation();  // this Esc was for the menu, not the banner or the list
  });
  document.addEventListener("click", (e) => {
    for (const menu of openMenus()) if (!menu.contains(e.target)) menu.open = false;
  });

  const link = document.getElementById("more-chats");
  if (!link) return;
  link.addEventListener("click", (event) => { event.preventDefault(); loadMore(link, true); });
  if ("IntersectionObserver" in window) {  // scrolled to: load, but never leave the page by itself
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && document.body.contains(link)) loadMore(link, false);
    }).observe(link);
  }
})();

// ---------- error banners and message lengths, on every page ----------
// The script's own banner (a websocket error) is announced (role=alert) and closes with its
// × button; Esc closes it, and the server's flash (base.html), unless a menu is open (Esc
// closes that first). A message box with `data-max` never cuts what is typed or pasted:
// over the limit a note says by how much, and its form is not sent until it is shorter.
function sentence(text) {  // a server's message as a sentence: a capital first, a full stop last
  const s = String(text || "").trim();
  if (!s) return "";
  const capital = s[0].toUpperCase() + s.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function showBanner(message) {
  for (const old of document.querySelectorAll("#flash, #flash-dismissed")) old.remove();
  const box = document.createElement("div"), text = document.createElement("span");
  const close = document.createElement("button");
  box.id = "flash";
  box.className = "flash error";
  box.setAttribute("role", "alert");
  text.className = "flash-text";
  text.textContent = message;
  Object.assign(close, { type: "button", className: "dismiss", textContent: "×", title: "Dismiss" });
  close.setAttribute("aria-label", "Dismiss this message");
  close.addEventListener("click", () => box.remove());
  box.append(text, close);
  document.body.prepend(box);
}

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  const nav = document.getElementById("nav-toggle");
  if (document.querySelector("details.actions-menu[open], details.item-menu[open]") || (nav && nav.checked)) return;
  const box = document.getElementById("flash"), dismissed = document.getElementById("flash-dismissed");
  if (dismissed) dismissed.checked = true;  // the server's: its checkbox hides it
  else if (box) box.remove();
});

(() => {
  const notes = new WeakMap();  // a message box -> its note, made when first needed
  function withinLimit(area) {
    const max = Number(area.dataset.max) || 0, n = [...area.value.trim()].length;  // code points, as the server counts
    let note = notes.get(area);
    if (!max || n <= max) {
      if (note) note.hidden = true;
      area.removeAttribute("aria-invalid");
      return true;
    }
    if (!note) {
      note = document.createElement("p");
      note.className = "over-limit";
      note.setAttribute("role", "status");
      (area.closest("form") || area).before(note);
      notes.set(area, note);
    }
    const split = n <= 2 * max ? "two messages" : "several messages";
    note.textContent = `Your message is ${n.toLocaleString("en")} characters long; the limit is ` +
      `${max.toLocaleString("en")}. Shorten it or split it into ${split}: nothing was cut.`;
    note.hidden = false;
    area.setAttribute("aria-invalid", "true");
    return false;
  }
  document.addEventListener("input", (e) => {
    if (e.target instanceof HTMLTextAreaElement && e.target.dataset.max) withinLimit(e.target);
  });
  document.addEventListener("submit", (e) => {  // capture: before the chat sends it over the socket
    const area = e.target instanceof HTMLFormElement ? e.target.querySelector("textarea[data-max]") : null;
    if (area && !withinLimit(area)) {
      e.preventDefault();
      e.stopImmediatePropagation();
      area.focus();
    }
  }, true);
})();

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

  function notify(message) { showBanner(message); }  // in place of the page's flash, if any

  // What a socket's error frame says, for people: a plain sentence with what to do. Refusals
  // (`rejected`, `persona_unavailable`) are the domain's own sentences; a failed reply's
  // reason is the inference server's, too technical to show.
  const SAYS = {
    not_found: "That chat or message is not there any more. Reload the page.",
    busy: "The server is busy and saved nothing. Try again in a few seconds.",
    internal: "Something went wrong on the server. Try again.",
    session_ended: "Your session has ended. Log in again.",
    frame_too_large: "That is too much to send at once. Shorten your message.",
    malformed: "The page sent something the server could not read. Reload the page.",
    invalid: "The page sent something the server could not read. Reload the page.",
    reply_failed: "The reply could not be written. Regenerate it (↻) or try again in a moment.",
  };
  function friendly(f) {
    return SAYS[f.code] || sentence(f.message) || "Something went wrong. Try again.";
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
  function copyButton(label, text) {
    const button = el("button", "copy-btn small-btn", "Copy");
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", () => copyFrom(button, text()));
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
    else notify(friendly(f));
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
    const text = sentence(message || "too many messages at once");
    clearInterval(state.limitTimer);
    const tick = () => {
      const left = Math.ceil((state.limitUntil - Date.now()) / 1000);
      if (left <= 0) {
        clearInterval(state.limitTimer);
        limitNote.hidden = true;
        setBusy();
        return;
      }
      limitNote.textContent = `${text} You can send again in ${formatWait(left)}.`;
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
    } else if (form.classList.contains("branches")) {
      e.preventDefault();  // no socket needed: the form is posted in the background
      const id = e.submitter && e.submitter.value;
      if (id && !state.inflight && !state.replyId) switchBranch(form, e.submitter);
      return;
    } else {
      return;
    }
    setBusy();
  });

  // ---------- branches ----------
  // ‹ and › post their form in the background and swap in the page's new thread, keeping the
  // switched message where it was on the screen and naming it in the URL's hash; without
  // this script the form posts and the page reloads at that message.
  let switching = false;
  async function switchBranch(form, button) {
    if (switching) return;
    switching = true;
    const messageId = button.value, label = button.getAttribute("aria-label");
    const before = form.closest(".turn").getBoundingClientRect().top;
    const data = new FormData(form);  // with the CSRF token
    data.set("message_id", messageId);
    try {
      const res = await fetch(form.action, {
        method: "POST", body: data, credentials: "same-origin", redirect: "manual", signal: AbortSignal.timeout(15000),
      });
      if (res.type !== "opaqueredirect") {  // refused: the error page says why
        const doc = new DOMParser().parseFromString(await res.text(), "text/html");
        notify(doc.querySelector(".card .muted")?.textContent || `Could not switch versions (HTTP ${res.status}).`);
        return;
      }
      if (refreshing) await refreshing;  // one begun before the switch would show the old branch
      await refresh();
      const switched = $(`m-${messageId}`);
      if (!switched) return;
      thread().scrollTop += switched.getBoundingClientRect().top - before;
      history.replaceState(null, "", `#m-${messageId}`);
      const buttons = [...switched.querySelectorAll(".branches button:not(:disabled)")];
      (buttons.find((b) => b.getAttribute("aria-label") === label) || buttons[0])?.focus({ preventScroll: true });
    } catch (_) {
      notify("Could not switch versions: check the connection and try again.");
    } finally {
      switching = false;
    }
  }

  // ---------- the edit box ----------
  // Opening "Edit" puts the cursor at the end of the text and a Cancel button beside Save
  // (made here: without this script the "Edit" summary closes the box); Cancel and Esc close
  // it and put the text back.
  function closeEdit(box) {
    const area = box.querySelector("textarea");
    area.value = area.defaultValue;
    box.open = false;
    box.querySelector("summary").focus();
  }
  document.addEventListener("toggle", (e) => {  // toggle does not bubble: caught on the way down
    const box = e.target;
    if (!(box instanceof HTMLDetailsElement) || !box.classList.contains("edit") || !box.open) return;
    const actions = box.querySelector(".edit-actions"), area = box.querySelector("textarea");
    if (actions && !actions.querySelector(".edit-cancel")) {
      const cancel = el("button", "edit-cancel small-btn", "Cancel");
      cancel.type = "button";
      cancel.addEventListener("click", () => closeEdit(box));
      actions.prepend(cancel);
    }
    if (document.activeElement === area) return;  // typing already (the toggle comes late): leave the cursor
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }, true);
  document.addEventListener("keydown", (e) => {  // capture: this Esc is the edit box's alone
    if (e.key !== "Escape" || e.isComposing || !(e.target instanceof Element)) return;
    const box = e.target.closest("details.edit[open]");
    if (!box) return;
    e.stopPropagation();
    closeEdit(box);
  }, true);

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
    // (over the limit, the note above the composer says the rest, in a sentence)
    counter.textContent = `${n.toLocaleString()} / ${maxChars.toLocaleString()}`;
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
