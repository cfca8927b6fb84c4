// Documents being ingested, shared by a knowledge base's page and a conversation's attached
// files: the live progress stream (one SSE request per knowledge base, not polling, which the
// rate limit would count), upload results per file, and how a status and a size read.

import { ApiError, streamAnswer, upload } from "./api.js";
import { h } from "./dom.js";
import { getLang, t, tr } from "./i18n.js";

const ACTIVE = new Set(["queued", "processing"]);
const RETRY_DELAY_MS = 3000;

/** Whether a document is still being ingested. */
export function isActive(doc) {
  return ACTIVE.has(doc.status);
}

/**
 * Follows `progressPath` (SSE: {"type": "documents"} on each change, then {"type": "settled"})
 * while any document is queued or processing; `onDocuments(list)` gets every update, and
 * `listDocuments()` reads them once more after a stream ends. `start()` after an upload or a
 * re-index; `stop()` when the page goes.
 */
export class ProgressWatch {
  constructor(progressPath, listDocuments, onDocuments) {
    this.progressPath = progressPath;
    this.listDocuments = listDocuments;
    this.onDocuments = onDocuments;
    this.controller = null;
    this.stopped = false;
  }

  /** Follow the progress unless already following it. */
  start() {
    if (this.controller || this.stopped) return;
    this.controller = new AbortController();
    this.run(this.controller);
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
    this.controller = null;
  }

  async run(controller) {
    let failed = false;
    try {
      await streamAnswer("GET", this.progressPath, undefined, controller.signal, (event) => {
        if (event.type === "documents") this.onDocuments(event.documents);
      });
    } catch (e) {
      if (e.name === "AbortError") return;
      failed = true; // a lost connection: look again a little later
    }
    if (this.controller !== controller) return;
    this.controller = null;
    if (this.stopped) return;
    // an upload that landed just as the server said "settled" is not missed: look once more
    let documents;
    try {
      if (failed) await new Promise((resolve) => setTimeout(resolve, RETRY_DELAY_MS));
      documents = await this.listDocuments();
    } catch {
      return; // gone (404), logged out, or offline: the page's next load looks again
    }
    if (this.stopped) return;
    this.onDocuments(documents);
    if (documents.some(isActive)) this.start();
  }
}

/** The status of a document as shown: a translated word (data-status for styles and tests). */
export function statusLabel(doc) {
  return h("span", { class: `doc-status status-${doc.status}`, "data-status": doc.status,
    i18n: `doc.${doc.status}` });
}

/** A progress bar for a document, or null once it is no longer active. */
export function progressBar(doc) {
  if (!isActive(doc)) return null;
  return h("progress", { class: "doc-progress", max: 1, value: doc.progress,
    "aria-label": `${Math.round(doc.progress * 100)}%` });
}

/** "1.2 MB" in the page's language. */
export function formatSize(bytes) {
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toLocaleString(getLang(), { maximumFractionDigits: digits })} ${units[unit]}`;
}

/**
 * Upload `files` to `path` and show what became of each in `resultsEl` (queued, duplicate,
 * rejected and why; or the whole upload's error, such as 413). True when any file was taken.
 */
export async function uploadFiles(path, files, resultsEl) {
  resultsEl.replaceChildren(h("li", { class: "upload-pending", i18n: "upload.sending" }));
  let answer;
  try {
    answer = await upload(path, files);
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    resultsEl.replaceChildren(uploadError(e), dismiss(resultsEl));
    return false;
  }
  resultsEl.replaceChildren(
    ...answer.uploaded.map((u) => h("li", { class: u.duplicate ? "upload-duplicate"
      : "upload-ok", "data-file": u.file_name },
    h("strong", {}, u.file_name), " ",
    h("span", { i18n: u.duplicate ? "upload.duplicate" : "upload.queued" }))),
    ...answer.rejected.map((r) => h("li", { class: "upload-rejected", "data-file": r.file_name },
      h("strong", {}, r.file_name), " ",
      h("span", { i18n: REJECT_KEYS[r.code] || "upload.rejected" }),
      h("small", { class: "error-detail" }, r.message))),
    dismiss(resultsEl),
  );
  return answer.uploaded.length > 0;
}

function dismiss(resultsEl) {
  return h("li", { class: "upload-dismiss" }, h("button", { type: "button", class: "icon",
    "i18n-title": "upload.dismiss", "i18n-aria-label": "upload.dismiss",
    onclick: () => resultsEl.replaceChildren() }, "✕"));
}

const REJECT_KEYS = {
  unsupported_type: "upload.unsupportedType",
  too_large: "upload.fileTooLarge",
  unreadable: "upload.unreadable",
};

function uploadError(error) {
  const key = { 413: "upload.tooLarge", 403: "upload.forbidden", 429: "err.429" }[error.status]
    || "upload.failed";
  return h("li", { class: "upload-rejected", role: "alert" },
    h("span", { i18n: key }), " ", h("small", { class: "error-detail" }, error.message));
}

/** Show `message` in `el` as an error (the server's words), or clear it. */
export function showProblem(el, error) {
  el.removeAttribute("data-i18n");
  if (!error) {
    el.textContent = "";
    return;
  }
  if (error instanceof ApiError && error.status === 403) tr(el, "kb.forbidden");
  else el.textContent = error.message || t("err.other");
}
