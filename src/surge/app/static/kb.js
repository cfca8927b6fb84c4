// One knowledge base (#/kbs/ID): its settings, its documents with status and a live progress
// bar (one SSE stream for the whole knowledge base), an upload of several files at once with
// the result of each, cancel, re-index and delete a document, and the retrieval test.

import { ApiError, api } from "./api.js";
import { clear, h } from "./dom.js";
import { getLang, t, tr } from "./i18n.js";
import { ProgressWatch, formatSize, isActive, progressBar, showProblem, statusLabel,
  uploadFiles } from "./documents.js";
import { VISIBILITIES, visibilityLabel } from "./kbs.js";
import { retrievalPanel } from "./retrieval.js";

/** Show knowledge base `kbId` in `root`; the page's `close()` stops its progress stream. */
export async function showKb(root, kbId) {
  let kb;
  try {
    kb = await api("GET", `api/kbs/${kbId}`);
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) throw e;
    clear(root).append(h("div", { class: "kb-page" },
      h("p", { class: "kb-missing", i18n: "kb.notFound" }),
      h("a", { href: "#/kbs", i18n: "kb.back" })));
    return { close() {} };
  }
  const page = new KbPage(root, kb);
  await page.load();
  return page;
}

class KbPage {
  constructor(root, kb) {
    this.kb = kb;
    this.rows = new Map(); // document id → its table row
    const base = `api/kbs/${kb.id}/documents`;
    this.base = base;
    this.watch = new ProgressWatch(`${base}/progress`, () => api("GET", base),
      (docs) => this.showDocuments(docs));
    this.message = h("p", { class: "form-message error", role: "alert" });
    this.tbody = h("tbody");
    this.empty = h("p", { class: "hint docs-empty", i18n: "kb.noDocuments", hidden: true });
    const table = h("table", { class: "doc-table" },
      h("thead", {}, h("tr", {}, ["doc.file", "doc.size", "doc.status", "doc.chunks",
        "kb.created", null].map((key) => h("th", key ? { i18n: key } : {})))),
      this.tbody);
    clear(root).append(h("div", { class: "kb-page kb-detail", "data-kb": kb.id },
      h("a", { href: "#/kbs", class: "back", i18n: "kb.back" }),
      this.header(),
      kb.can_write ? this.uploadForm() : h("p", { class: "hint", i18n: "kb.readOnly" }),
      this.message,
      h("h3", { i18n: "kb.documents" }), table, this.empty,
      retrievalPanel(kb)));
  }

  header() {
    const kb = this.kb;
    const visibility = kb.can_manage
      ? h("select", { class: "kb-visibility", "i18n-aria-label": "kb.visibility",
        onchange: async (e) => {
          try {
            this.kb = await api("PATCH", `api/kbs/${kb.id}`, { visibility: e.target.value });
            showProblem(this.message, null);
          } catch (err) {
            if (!(err instanceof ApiError)) throw err;
            showProblem(this.message, err);
          }
        } }, VISIBILITIES.map((v) => h("option", { value: v, i18n: `kb.vis.${v}`,
        selected: v === kb.visibility })))
      : visibilityLabel(kb.visibility);
    return h("header", { class: "kb-header" },
      h("h2", { class: "kb-name" }, kb.name),
      kb.description ? h("p", { class: "kb-description" }, kb.description) : null,
      h("dl", { class: "kb-meta" },
        h("dt", { i18n: "kb.visibility" }), h("dd", {}, visibility),
        h("dt", { i18n: "kb.owner" }), h("dd", {}, kb.owner || "?"),
        h("dt", { i18n: "kb.embeddingModel" }),
        h("dd", kb.embedding_model ? {} : { i18n: "kb.keywordsOnly" }, kb.embedding_model),
        h("dt", { i18n: "kb.splitting" }),
        tr(h("dd"), "kb.splitValue", null, { size: kb.chunk_size, overlap: kb.overlap })));
  }

  uploadForm() {
    const input = h("input", { type: "file", multiple: true, class: "upload-input",
      accept: ".txt,.md,.markdown,.pdf,.docx,.html,.htm", "i18n-aria-label": "kb.chooseFiles" });
    const results = h("ul", { class: "upload-results", "aria-live": "polite" });
    const button = h("button", { type: "submit", class: "primary upload", i18n: "kb.upload" });
    return h("form", { class: "upload-form", onsubmit: async (e) => {
      e.preventDefault();
      if (!input.files.length) return;
      button.disabled = true;
      try {
        if (await uploadFiles(this.base, [...input.files], results)) {
          input.value = "";
          await this.refresh();
        }
      } finally {
        button.disabled = false;
      }
    } }, h("div", { class: "row" }, input, button),
    h("p", { class: "hint", i18n: "kb.uploadHint" }), results);
  }

  async load() {
    await this.refresh();
  }

  /** Read the documents again, and follow their progress while any is active. */
  async refresh() {
    const docs = await api("GET", this.base);
    this.showDocuments(docs);
    if (docs.some(isActive)) this.watch.start();
  }

  close() {
    this.watch.stop();
  }

  showDocuments(docs) {
    const seen = new Set();
    for (const doc of docs) {
      seen.add(doc.id);
      let row = this.rows.get(doc.id);
      if (!row) {
        row = this.makeRow(doc);
        this.rows.set(doc.id, row);
        this.tbody.append(row.el);
      }
      row.update(doc);
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.el.remove();
        this.rows.delete(id);
      }
    }
    this.empty.hidden = docs.length > 0;
  }

  /** A row whose cells are updated in place (a button being clicked is never replaced). */
  makeRow(doc) {
    const status = h("td", { class: "status-cell" });
    const chunks = h("td", { class: "num" });
    const write = this.kb.can_write;
    const act = (key, cls, call) => h("button", { type: "button", class: cls, i18n: key,
      hidden: true, onclick: () => this.act(call) });
    const cancel = write ? act("doc.cancel", "cancel-doc",
      () => api("POST", `${this.base}/${doc.id}/cancel`)) : null;
    const reindex = write ? act("doc.reindex", "reindex-doc",
      () => api("POST", `${this.base}/${doc.id}/reindex`)) : null;
    const remove = write ? act("chat.delete", "delete-doc", () => {
      if (!confirm(t("doc.confirmDelete", { name: doc.file_name }))) return false;
      return api("DELETE", `${this.base}/${doc.id}`);
    }) : null;
    const el = h("tr", { class: "doc-row", "data-doc": doc.id, "data-file": doc.file_name },
      h("td", {}, h("a", { href: `${this.base}/${doc.id}/file`, class: "doc-file",
        download: doc.file_name }, doc.file_name)),
      h("td", { class: "num" }, formatSize(doc.size_bytes)),
      status, chunks,
      h("td", {}, new Date(doc.created_at).toLocaleString(getLang())),
      h("td", { class: "actions" }, cancel, reindex, remove));
    const update = (d) => {
      el.setAttribute("data-status", d.status);
      const error = d.error ? h("small", { class: "error-detail doc-error" }, d.error) : null;
      clear(status).append(...[statusLabel(d), progressBar(d), error].filter(Boolean));
      chunks.textContent = d.status === "done" ? d.num_chunks.toLocaleString(getLang()) : "";
      if (cancel) cancel.hidden = !isActive(d);
      if (reindex) reindex.hidden = d.status === "processing";
      if (remove) remove.hidden = false;
    };
    return { el, update };
  }

  /** A document action, then the documents again (and their progress). */
  async act(call) {
    try {
      if ((await call()) === false) return; // not confirmed
      showProblem(this.message, null);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(this.message, e);
    }
    await this.refresh();
  }
}
