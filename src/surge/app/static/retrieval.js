// The retrieval test of a knowledge base: what a question retrieves (hybrid, keywords only or
// vectors only), each hit with its file, page, heading, every score, and whether it clears the
// relevance threshold an answer uses.

import { ApiError, api } from "./api.js";
import { clear, h } from "./dom.js";
import { getLang, t, tr } from "./i18n.js";
import { showProblem } from "./documents.js";

const MODES = ["hybrid", "bm25", "vector"];

/** The retrieval test panel of knowledge base `kb`. */
export function retrievalPanel(kb) {
  const query = h("input", { type: "search", class: "retrieval-query", required: true,
    maxlength: 10000, "i18n-placeholder": "ret.placeholder", "i18n-aria-label": "ret.query" });
  const mode = h("select", { class: "retrieval-mode", "i18n-aria-label": "ret.mode" },
    MODES.map((m) => h("option", { value: m, i18n: `ret.mode.${m}` })));
  const topK = h("input", { type: "number", class: "retrieval-topk", min: 1, max: 50, value: 5,
    "i18n-aria-label": "ret.topK", "i18n-title": "ret.topK" });
  const message = h("p", { class: "form-message error", role: "alert" });
  const summary = h("p", { class: "hint retrieval-summary" });
  const hits = h("ol", { class: "hits" });
  const button = h("button", { type: "submit", class: "primary", i18n: "ret.search" });
  const form = h("form", { class: "retrieval-form row", onsubmit: async (e) => {
    e.preventDefault();
    if (!query.value.trim()) return;
    button.disabled = true;
    try {
      const result = await api("POST", `api/kbs/${kb.id}/search`, {
        query: query.value, mode: mode.value, top_k: Number(topK.value) || 5 });
      showProblem(message, null);
      show(result);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      showProblem(message, err);
    } finally {
      button.disabled = false;
    }
  } }, query, mode, h("label", { class: "topk" }, h("span", { i18n: "ret.topK" }), topK), button);

  function show(result) {
    clear(hits);
    tr(summary, "ret.summary", null, { count: result.hits.length,
      vector: fmt(result.min_vector), coverage: fmt(result.min_coverage) });
    if (!result.hits.length) hits.append(h("li", { class: "hint", i18n: "ret.none" }));
    for (const hit of result.hits) hits.append(hitItem(hit));
  }

  return h("section", { class: "retrieval" },
    h("h3", { i18n: "ret.title" }), h("p", { class: "hint", i18n: "ret.hint" }),
    form, message, summary, hits);
}

function fmt(value, digits = 3) {
  return Number(value).toLocaleString(getLang(), { maximumFractionDigits: digits,
    minimumFractionDigits: digits });
}

function hitItem(hit) {
  const p = hit.passage;
  const score = (key, value, rank) => h("span", { class: `score score-${key}` },
    h("span", { class: "score-name", i18n: `ret.score.${key}` }), " ",
    h("span", { class: "score-value" }, fmt(value)),
    rank ? h("span", { class: "score-rank" }, ` (#${rank})`) : null);
  const text = h("p", { class: "hit-text clamped", "i18n-title": "ret.expand",
    onclick: () => text.classList.toggle("clamped") }, p.text);
  return h("li", { class: hit.relevant ? "hit relevant" : "hit", "data-rank": hit.rank },
    h("div", { class: "hit-where" }, h("strong", { class: "hit-file" }, p.file_name),
      p.page ? tr(h("span", { class: "hit-page" }), "cite.page", null, { page: p.page }) : null,
      p.heading ? h("span", { class: "hit-heading" }, p.heading) : null,
      h("span", { class: hit.relevant ? "badge relevant" : "badge",
        i18n: hit.relevant ? "ret.relevant" : "ret.notRelevant" })),
    h("div", { class: "hit-scores" }, score("hybrid", hit.hybrid),
      score("bm25", hit.bm25, hit.bm25_rank), score("vector", hit.vector, hit.vector_rank),
      score("coverage", hit.coverage)),
    text);
}
