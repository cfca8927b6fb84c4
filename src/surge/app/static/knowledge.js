// A conversation's knowledge, above its messages: the knowledge bases it answers from (a
// picker of those the user may read; each answer then cites them) and the files attached to
// it (file chat: a hidden knowledge base of the conversation), with their ingestion status.

import { ApiError, api } from "./api.js";
import { clear, h } from "./dom.js";
import { ProgressWatch, isActive, progressBar, showProblem, statusLabel,
  uploadFiles } from "./documents.js";

/** The knowledge bar; `ensureConversation()` makes the conversation when it doesn't exist yet
 * (attaching something to a new chat creates it). */
export class KnowledgeBar {
  constructor({ ensureConversation }) {
    this.ensureConversation = ensureConversation;
    this.conversationId = null;
    this.kbIds = [];
    this.kbs = []; // those the user may read, for the picker and the chips' names
    this.watch = null;
    this.chips = h("span", { class: "kb-chips" });
    this.files = h("span", { class: "file-chips" });
    this.results = h("ul", { class: "upload-results", "aria-live": "polite" });
    this.message = h("span", { class: "form-message error", role: "alert" });
    this.picker = h("div", { class: "kb-picker", hidden: true });
    this.fileInput = h("input", { type: "file", multiple: true, class: "attach-input",
      hidden: true, accept: ".txt,.md,.markdown,.pdf,.docx,.html,.htm",
      onchange: () => this.attachFiles() });
    const toggle = h("button", { type: "button", class: "kb-picker-toggle",
      "aria-haspopup": "true", i18n: "know.pick", onclick: () => this.togglePicker() });
    const attach = h("button", { type: "button", class: "attach-file", i18n: "know.attach",
      "i18n-title": "know.attachHint", onclick: () => this.fileInput.click() });
    const anchor = h("span", { class: "picker-anchor" }, toggle, this.picker);
    this.onOutsideClick = (e) => { if (!anchor.contains(e.target)) this.picker.hidden = true; };
    document.addEventListener("click", this.onOutsideClick);
    this.el = h("div", { class: "knowledge-bar" },
      h("div", { class: "row" },
        h("span", { class: "knowledge-label", i18n: "know.label" }),
        this.chips, this.files,
        anchor, attach, this.fileInput,
        this.message),
      this.results);
    this.picker.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        this.picker.hidden = true;
        toggle.focus();
      }
    });
  }

  /** Show conversation `conversationId`'s knowledge (null: a new chat); its answers' saved
   * sources by message id. */
  async load(conversationId) {
    this.close();
    this.conversationId = conversationId;
    const [kbs, knowledge] = await Promise.all([
      api("GET", "api/kbs").catch(() => []),
      conversationId === null ? null : api("GET", `api/conversations/${conversationId}/knowledge`),
    ]);
    this.kbs = kbs;
    this.kbIds = knowledge ? knowledge.kb_ids : [];
    this.showKbs();
    this.showFiles(knowledge ? knowledge.files : []);
    if (knowledge?.files.some(isActive)) this.follow();
    return knowledge ? knowledge.sources : {};
  }

  /** Stop following the files' progress. */
  close() {
    this.watch?.stop();
    this.watch = null;
  }

  /** The page goes: stop everything. */
  destroy() {
    this.close();
    document.removeEventListener("click", this.onOutsideClick);
  }

  showKbs() {
    clear(this.chips);
    for (const id of this.kbIds) {
      const kb = this.kbs.find((k) => k.id === id);
      this.chips.append(h("span", { class: "chip kb-chip", "data-kb": id },
        kb ? kb.name : `#${id}`,
        h("button", { type: "button", class: "icon detach", "i18n-title": "know.detach",
          "i18n-aria-label": "know.detach", onclick: () => this.setKbs(this.kbIds
            .filter((k) => k !== id)) }, "✕")));
    }
  }

  /** Open the picker with the knowledge bases as they are now (one may have been made since). */
  async togglePicker() {
    if (!this.picker.hidden) {
      this.picker.hidden = true;
      return;
    }
    try {
      this.kbs = await api("GET", "api/kbs");
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(this.message, e);
      return;
    }
    this.showKbs();
    clear(this.picker);
    if (!this.kbs.length) {
      this.picker.append(h("p", { class: "hint" }, h("span", { i18n: "know.noKbs" }), " ",
        h("a", { href: "#/kbs", i18n: "know.makeKb" })));
    }
    for (const kb of this.kbs) {
      const box = h("input", { type: "checkbox", value: kb.id,
        checked: this.kbIds.includes(kb.id), onchange: () => {
          const ids = [...this.picker.querySelectorAll("input:checked")]
            .map((b) => Number(b.value));
          this.setKbs(ids);
        } });
      this.picker.append(h("label", { class: "kb-option", "data-kb": kb.id }, box,
        h("span", {}, kb.name),
        kb.owner ? h("small", { class: "hint" }, kb.owner) : null));
    }
    this.picker.hidden = false;
    this.picker.querySelector("input")?.focus();
  }

  async setKbs(ids) {
    try {
      const conv = await this.ensureConversation();
      this.conversationId = conv.id;
      const knowledge = await api("PUT", `api/conversations/${conv.id}/kbs`, { kb_ids: ids });
      this.kbIds = knowledge.kb_ids;
      showProblem(this.message, null);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(this.message, e);
    }
    this.showKbs();
    for (const box of this.picker.querySelectorAll("input")) {
      box.checked = this.kbIds.includes(Number(box.value));
    }
  }

  async attachFiles() {
    const files = [...this.fileInput.files];
    this.fileInput.value = "";
    if (!files.length) return;
    let conv;
    try {
      conv = await this.ensureConversation();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(this.message, e);
      return;
    }
    this.conversationId = conv.id;
    if (await uploadFiles(`api/conversations/${conv.id}/files`, files, this.results)) {
      // the files' chips show how each one goes on: keep only duplicates and refusals here
      for (const ok of this.results.querySelectorAll(".upload-ok")) ok.remove();
      if (this.results.children.length === 1) this.results.replaceChildren();
      await this.refreshFiles();
      this.follow();
    }
  }

  async refreshFiles() {
    const knowledge = await api("GET", `api/conversations/${this.conversationId}/knowledge`);
    this.showFiles(knowledge.files);
    return knowledge.files;
  }

  follow() {
    if (!this.watch) {
      const base = `api/conversations/${this.conversationId}`;
      this.watch = new ProgressWatch(`${base}/files/progress`,
        async () => (await api("GET", `${base}/knowledge`)).files,
        (docs) => this.showFiles(docs));
    }
    this.watch.start();
  }

  showFiles(docs) {
    clear(this.files);
    for (const doc of docs) {
      this.files.append(h("span", { class: "chip file-chip", "data-doc": doc.id,
        "data-file": doc.file_name, "data-status": doc.status },
      doc.file_name, " ", statusLabel(doc), progressBar(doc),
      doc.error ? h("small", { class: "error-detail", title: doc.error }, "!") : null,
      h("button", { type: "button", class: "icon detach", "i18n-title": "know.removeFile",
        "i18n-aria-label": "know.removeFile", onclick: () => this.removeFile(doc) }, "✕")));
    }
  }

  async removeFile(doc) {
    try {
      await api("DELETE", `api/conversations/${this.conversationId}/files/${doc.id}`);
      showProblem(this.message, null);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(this.message, e);
    }
    clear(this.results);
    await this.refreshFiles();
  }
}
