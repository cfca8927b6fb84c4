// The chat page: the conversation list (search, rename, delete) and one conversation (model,
// system prompt, temperature, messages, the composer). Answers stream in; Stop aborts the
// fetch, which closes the stream, and the server then closes the model's request.

import { ApiError, api, streamAnswer } from "./api.js";
import { PassagePanel, renderCited, sourcesOf } from "./citations.js";
import { clear, copyText, h } from "./dom.js";
import { t, tr } from "./i18n.js";
import { KnowledgeBar } from "./knowledge.js";
import { flash, renderMarkdown } from "./render.js";
import { renderSidebar } from "./sidebar.js";

const STATUS_KEYS = { retrieving: "status.retrieving", generating: "status.generating" };
const ERROR_KEYS = { 429: "err.429", 502: "err.502", 503: "err.503", 504: "err.504", 500: "err.500" };

/** Show the chat page in `root`: conversation `conversationId`, or a new one when null. */
export async function showChat(root, conversationId) {
  const view = new ChatView(root);
  await view.open(conversationId);
  return view;
}

class ChatView {
  constructor(root) {
    this.conv = null; // the conversation shown (null: a new one, created at the first send)
    this.pending = { system_prompt: "", temperature: null }; // settings before it exists
    this.controller = null; // the AbortController of the answer under way (sent, not ended)
    this.closed = false; // the page moved on: this view must not touch the URL any more
    this.renderQueued = new Set();
    this.build(root);
  }

  get conversationId() {
    return this.conv ? this.conv.id : null;
  }

  build(root) {
    this.messages = h("div", { class: "messages", "aria-live": "off" });
    this.status = h("div", { class: "status-line", role: "status", "aria-live": "polite" });
    this.input = h("textarea", {
      class: "composer-input",
      rows: 3,
      "i18n-placeholder": "chat.placeholder",
      onkeydown: (e) => {
        if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
          e.preventDefault();
          this.submit();
        }
      },
    });
    this.sendButton = h("button", { type: "submit", class: "send primary", i18n: "chat.send" });
    const composer = h("form", { class: "composer", onsubmit: (e) => {
      e.preventDefault();
      this.submit();
    } }, this.input, this.sendButton);
    this.title = h("h2", { class: "conv-title" });
    this.modelSelect = h("select", { class: "model-select", "i18n-aria-label": "chat.model",
      onchange: () => this.saveSettings({ model: this.modelSelect.value || null }) });
    this.settings = this.buildSettings();
    const settingsButton = h("button", { type: "button", class: "settings-toggle",
      i18n: "chat.settings", onclick: () => { this.settings.hidden = !this.settings.hidden; } });
    const head = h("div", { class: "chat-head" }, this.title, this.modelSelect, settingsButton);
    this.knowledge = new KnowledgeBar({ ensureConversation: () => this.ensureConversation() });
    this.passages = new PassagePanel();
    const main = h("section", { class: "chat-main" },
      head, this.settings, this.knowledge.el, this.messages, this.status, composer);
    this.sidebar = renderSidebar({
      onNew: () => this.startNew(),
      onDeleted: (id) => { if (id === this.conversationId) location.hash = "#/"; },
      onRenamed: (conv) => { if (conv.id === this.conversationId) this.setTitle(conv.title); },
    });
    clear(root).append(h("div", { class: "chat-layout" }, this.sidebar.el, main,
      this.passages.el));
  }

  buildSettings() {
    this.systemPrompt = h("textarea", { class: "system-prompt", rows: 3 });
    this.temperature = h("input", { type: "number", class: "temperature", min: 0, max: 2,
      step: 0.1 });
    const saved = h("span", { class: "saved-note" });
    const form = h("form", { class: "settings", hidden: true, onsubmit: async (e) => {
      e.preventDefault();
      const value = this.temperature.value.trim();
      await this.saveSettings({ system_prompt: this.systemPrompt.value,
        temperature: value === "" ? null : Number(value) });
      tr(saved, "chat.saved");
    } },
    h("label", {}, h("span", { i18n: "chat.systemPrompt" }), this.systemPrompt),
    h("label", {}, h("span", { i18n: "chat.temperature" }), this.temperature),
    h("div", { class: "row" }, h("button", { type: "submit", i18n: "chat.save" }), saved));
    return form;
  }

  /** Refresh the conversation list, and the title (the server names a new conversation after
   * its first message). */
  async refreshList() {
    const conversations = await this.sidebar.refresh(this.conversationId);
    const mine = conversations?.find((c) => c.id === this.conversationId);
    if (mine) this.setTitle(mine.title);
  }

  /** New chat: this page already is one unless it shows a conversation or an answer streams. */
  startNew() {
    if (this.conv === null && !this.controller) this.input.focus();
    else location.hash = "#/";
  }

  async open(conversationId) {
    const models = this.loadModels();
    this.sidebar.refresh(conversationId);
    if (conversationId === null) {
      this.conv = null;
      this.showMessages([]);
      this.fillSettings(this.pending);
    } else {
      try {
        this.conv = await api("GET", `api/conversations/${conversationId}`);
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) {
          location.hash = "#/";
          return;
        }
        throw e;
      }
      this.fillSettings(this.conv);
      this.showMessages(this.conv.messages);
    }
    this.showSources(await this.knowledge.load(conversationId));
    await models;
    this.selectModel();
    this.input.focus();
  }

  /** Stop what the page follows in the background (attached files' progress). */
  close() {
    this.closed = true;
    this.knowledge.destroy();
  }

  /** Give saved knowledge-base answers their sources (citations as links) again. */
  showSources(sources) {
    for (const el of this.messages.querySelectorAll(".msg-assistant")) {
      const saved = el.msg.id === null ? null : sources[el.msg.id];
      if (!saved) continue;
      el.sources = sourcesOf(saved);
      this.paint(el, true);
    }
  }

  async loadModels() {
    clear(this.modelSelect).append(h("option", { value: "", i18n: "chat.modelDefault" }));
    try {
      const { models } = await api("GET", "api/models");
      for (const id of models) this.modelSelect.append(h("option", { value: id }, id));
    } catch {
      this.modelSelect.append(h("option", { value: "", disabled: true, i18n: "chat.noModels" }));
    }
  }

  /** Show the conversation's model in the picker (one the service no longer lists too). */
  selectModel() {
    const wanted = (this.conv ? this.conv.model : this.pending.model) || "";
    if (wanted && ![...this.modelSelect.options].some((o) => o.value === wanted)) {
      this.modelSelect.append(h("option", { value: wanted }, wanted));
    }
    this.modelSelect.value = wanted;
  }

  fillSettings(source) {
    this.setTitle(source.title || "");
    this.systemPrompt.value = source.system_prompt || "";
    this.temperature.value = source.temperature ?? "";
  }

  setTitle(title) {
    if (title) {
      this.title.removeAttribute("data-i18n");
      this.title.textContent = title;
    } else {
      tr(this.title, "chat.untitled");
    }
  }

  async saveSettings(fields) {
    if (this.conv) {
      this.conv = { ...this.conv, ...(await api("PATCH", `api/conversations/${this.conv.id}`,
        fields)) };
    } else {
      Object.assign(this.pending, fields);
    }
  }

  async ensureConversation() {
    if (this.conv) return this.conv;
    const body = { ...this.pending, model: this.modelSelect.value || null };
    this.conv = { ...(await api("POST", "api/conversations", body)), messages: [] };
    if (!this.closed) history.replaceState(null, "", `#/c/${this.conv.id}`);
    return this.conv;
  }

  // --- messages -------------------------------------------------------------------------------

  showMessages(messages) {
    clear(this.messages);
    if (!messages.length) this.messages.append(h("p", { class: "hello", i18n: "chat.hello" }));
    for (const m of messages) {
      const el = this.addMessage(m);
      if (m.status === "stopped") this.showNote(el, "msg.stopped");
      if (m.status === "error") this.showError(el, 0, m.error || "", () => this.regenerate());
    }
    this.updateActions();
    this.scrollDown(true);
  }

  addMessage(m) {
    this.messages.querySelector(".hello")?.remove();
    const body = h("div", { class: m.role === "user" ? "msg-body plain" : "msg-body markdown" });
    const actions = h("div", { class: "msg-actions" });
    const el = h("article", { class: `msg msg-${m.role}` },
      h("div", { class: "msg-role", i18n: m.role === "user" ? "msg.you" : "msg.assistant" }),
      body, h("div", { class: "msg-note" }), actions);
    el.msg = { id: m.id ?? null, role: m.role, content: m.content || "" };
    this.paint(el, true);
    const copy = h("button", { type: "button", class: "copy", i18n: "msg.copy",
      onclick: async () => { if (await copyText(el.msg.content)) flash(copy, "msg.copied"); } });
    actions.append(copy);
    if (m.role === "user") {
      actions.append(h("button", { type: "button", class: "edit", i18n: "msg.edit",
        onclick: () => this.startEdit(el) }));
    } else {
      actions.append(h("button", { type: "button", class: "regenerate", i18n: "msg.regenerate",
        onclick: () => this.regenerate() }));
    }
    this.messages.append(el);
    return el;
  }

  paint(el, final) {
    const body = el.querySelector(".msg-body");
    if (el.msg.role === "user") body.textContent = el.msg.content;
    else if (final && el.sources) {
      renderCited(body, el.msg.content, el.sources, (p, n) => this.passages.open(p, n));
    } else renderMarkdown(body, el.msg.content, final);
  }

  /** Re-render a streaming answer at most once a frame. */
  queuePaint(el) {
    if (this.renderQueued.has(el)) return;
    this.renderQueued.add(el);
    requestAnimationFrame(() => {
      this.renderQueued.delete(el);
      if (!el.streaming) return; // the final paint came first
      const atBottom = this.isAtBottom();
      this.paint(el, false);
      this.scrollDown(atBottom);
    });
  }

  showNote(el, key) {
    tr(el.querySelector(".msg-note"), key);
  }

  showError(el, status, detail, retry) {
    el.classList.add("failed");
    const note = clear(el.querySelector(".msg-note"));
    note.removeAttribute("data-i18n");
    note.append(h("div", { class: "msg-error", role: "alert" },
      h("span", { class: "error-text", i18n: ERROR_KEYS[status] || (status === "network"
        ? "err.network" : "err.other") }),
      detail ? h("small", { class: "error-detail" }, detail) : null,
      h("button", { type: "button", class: "retry", i18n: "msg.retry", onclick: () => {
        if (!this.controller) retry();
      } })));
  }

  /** Show Regenerate on the last answer only, and no edits or regenerations while streaming. */
  updateActions() {
    const answers = [...this.messages.querySelectorAll(".msg-assistant")];
    answers.forEach((el, i) => {
      el.querySelector(".regenerate").hidden = i !== answers.length - 1 || !!this.controller;
    });
    for (const el of this.messages.querySelectorAll(".msg-user")) {
      el.querySelector(".edit").hidden = !!this.controller || el.msg.id === null;
    }
    for (const button of this.messages.querySelectorAll(".retry")) {
      button.disabled = !!this.controller;
    }
  }

  isAtBottom() {
    const m = this.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  scrollDown(really) {
    if (really) this.messages.scrollTop = this.messages.scrollHeight;
  }

  // --- sending --------------------------------------------------------------------------------

  submit() {
    if (this.controller) {
      this.controller.abort();
      return;
    }
    const text = this.input.value;
    if (!text.trim()) return;
    this.input.value = "";
    this.send(text);
  }

  async send(text) {
    // busy from now, not only once the stream opens: while a new conversation is being
    // created, Regenerate, Edit and "New chat" must already see an answer under way
    this.controller = new AbortController();
    const userEl = this.addMessage({ role: "user", content: text });
    const answerEl = this.addMessage({ role: "assistant", content: "" });
    this.setStreaming(true);
    this.scrollDown(true);
    let conv;
    try {
      conv = await this.ensureConversation();
    } catch (e) {
      this.controller = null;
      this.setStreaming(false);
      this.failed(answerEl, e, () => this.redo([userEl, answerEl], () => this.send(text)));
      return;
    }
    await this.stream("POST", `api/conversations/${conv.id}/messages`, { content: text }, {
      userEl, answerEl, redo: () => this.redo([userEl, answerEl], () => this.send(text)),
    });
  }

  async regenerate() {
    if (this.controller || !this.conv) return;
    const answers = this.messages.querySelectorAll(".msg-assistant");
    answers[answers.length - 1]?.remove();
    const answerEl = this.addMessage({ role: "assistant", content: "" });
    await this.stream("POST", `api/conversations/${this.conv.id}/regenerate`, undefined, {
      answerEl, redo: () => this.regenerate(),
    });
  }

  startEdit(userEl) {
    if (this.controller) return;
    const body = userEl.querySelector(".msg-body");
    const area = h("textarea", { class: "edit-input", rows: 3 });
    area.value = userEl.msg.content;
    const cancel = () => this.paint(userEl, true);
    clear(body).append(area, h("div", { class: "row" },
      h("button", { type: "button", class: "primary save-edit", i18n: "msg.saveSend",
        onclick: () => { if (area.value.trim()) this.editAndResend(userEl, area.value); } }),
      h("button", { type: "button", i18n: "chat.cancel", onclick: cancel })));
    area.focus();
  }

  async editAndResend(userEl, text) {
    while (userEl.nextElementSibling) userEl.nextElementSibling.remove();
    userEl.msg.content = text;
    this.paint(userEl, true);
    const answerEl = this.addMessage({ role: "assistant", content: "" });
    const path = `api/conversations/${this.conv.id}/messages/${userEl.msg.id}`;
    await this.stream("PUT", path, { content: text }, {
      answerEl, redo: () => { answerEl.remove(); this.editAndResend(userEl, text); },
    });
  }

  /** Remove the elements of a request that never started, then make it again. */
  redo(elements, again) {
    for (const el of elements) el.remove();
    again();
  }

  /**
   * Stream one answer into `answerEl`. Retry after an error: a request the server took
   * ("start" came) is answered again with regenerate; one it refused is made again (`redo`).
   */
  async stream(method, path, body, { userEl = null, answerEl, redo }) {
    this.controller ??= new AbortController();
    this.setStreaming(true);
    this.setStatus("status.waiting");
    let started = false;
    let ended = false;
    answerEl.streaming = true;
    const retry = () => (started ? this.regenerate() : redo());
    const onEvent = (event) => {
      if (event.type === "start") {
        started = true;
        if (userEl) userEl.msg.id = event.user_message_id;
      } else if (event.type === "status") {
        this.setStatus(STATUS_KEYS[event.state] || "status.waiting");
      } else if (event.type === "delta") {
        answerEl.msg.content += event.text;
        this.queuePaint(answerEl);
      } else if (event.type === "done" || event.type === "error") {
        ended = true;
        answerEl.streaming = false;
        answerEl.msg.id = event.message_id ?? null;
        answerEl.sources = sourcesOf(event);
        this.paint(answerEl, true);
        if (event.type === "error") this.showError(answerEl, event.status, event.message, retry);
      }
    };
    try {
      await streamAnswer(method, path, body, this.controller.signal, onEvent);
      if (!ended) this.showError(answerEl, "network", "", retry);
    } catch (e) {
      answerEl.streaming = false;
      if (e.name === "AbortError") {
        this.paint(answerEl, true);
        this.showNote(answerEl, "msg.stopped");
      } else {
        this.failed(answerEl, e, retry);
      }
    } finally {
      answerEl.streaming = false;
      this.controller = null;
      this.setStreaming(false);
      this.setStatus(null);
      this.updateActions();
      await this.refreshList();
    }
  }

  failed(answerEl, error, retry) {
    if (error instanceof ApiError) this.showError(answerEl, error.status, error.message, retry);
    else this.showError(answerEl, "network", String(error.message || ""), retry);
  }

  setStreaming(on) {
    tr(this.sendButton, on ? "chat.stop" : "chat.send");
    this.sendButton.classList.toggle("stop", on);
    this.updateActions();
  }

  setStatus(key) {
    if (key) tr(this.status, key);
    else {
      this.status.removeAttribute("data-i18n");
      this.status.textContent = "";
    }
  }
}
