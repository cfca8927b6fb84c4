// Knowledge-base answers: the server cuts each answer into segments, text, verified citations
// and unverified numbers. A verified [n] becomes a link that opens passage n (file, page,
// heading, text) in a side panel; an unverified number stays plain text, never a link. The
// markdown is still rendered (and sanitized) as a whole: each verified citation goes in as a
// private-use marker the sanitizer keeps, and the markers are swapped for links afterwards.

import { clear, h } from "./dom.js";
import { t, tr } from "./i18n.js";
import { renderMarkdown } from "./render.js";

const OPEN = "\uE000";
const CLOSE = "\uE001";
const MARKER = /\uE000(\d+)\uE001/g;

/** Sources as the server sends them (a `done` event or a saved message): only what we show. */
export function sourcesOf(event) {
  if (!event || !Array.isArray(event.segments)) return null;
  return { found: event.found, passages: event.passages || [], segments: event.segments,
    cited: event.cited || [] };
}

/**
 * Render answer `text` into `body` with its `sources`: markdown, verified citations as links
 * (`onOpen(passage, number)` on a click), and a list of the cited passages below.
 */
export function renderCited(body, text, sources, onOpen) {
  const byNumber = new Map(sources.passages.map((p) => [p.number, p]));
  const marked = sources.segments.map((s) => (s.type === "citation" && byNumber.has(s.number)
    ? `${OPEN}${s.number}${CLOSE}` : s.text)).join("");
  // segments cover the whole answer; fall back to the raw text if they somehow don't
  renderMarkdown(body, sources.segments.length ? marked : text, true);
  linkMarkers(body, byNumber, onOpen);
  const cited = sources.cited.map((n) => byNumber.get(n)).filter(Boolean);
  if (cited.length) {
    body.append(h("div", { class: "sources" },
      h("span", { class: "sources-title", i18n: "cite.sources" }),
      cited.map((p) => h("button", { type: "button", class: "source", "data-number": p.number,
        onclick: () => onOpen(p, p.number) }, `[${p.number}] `, where(p)))));
  }
  if (sources.found === false) body.classList.add("not-found");
}

function linkMarkers(body, byNumber, onOpen) {
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
  const nodes = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.nodeValue.includes(OPEN)) nodes.push(node);
  }
  for (const node of nodes) {
    const parts = [];
    let last = 0;
    for (const match of node.nodeValue.matchAll(MARKER)) {
      parts.push(node.nodeValue.slice(last, match.index));
      const number = Number(match[1]);
      const passage = byNumber.get(number);
      parts.push(h("a", { href: `#cite-${number}`, class: "citation", role: "button",
        "data-number": number, title: where(passage), onclick: (e) => {
          e.preventDefault(); // the hash routes the page: never follow it
          onOpen(passage, number);
        } }, `[${number}]`));
      last = match.index + match[0].length;
    }
    parts.push(node.nodeValue.slice(last));
    node.replaceWith(...parts.filter((p) => p !== ""));
  }
}

/** "guide.pdf · p. 3 · Installing" */
function where(passage) {
  const bits = [passage.file_name];
  if (passage.page) bits.push(t("cite.page", { page: passage.page }));
  if (passage.heading) bits.push(passage.heading);
  return bits.join(" · ");
}

/** The side panel that shows one cited passage. */
export class PassagePanel {
  constructor() {
    this.file = h("div", { class: "passage-file" });
    this.meta = h("div", { class: "passage-meta" });
    this.text = h("div", { class: "passage-text" });
    this.number = h("span", { class: "passage-number" });
    this.el = h("aside", { class: "passage-panel", hidden: true, role: "dialog",
      "i18n-aria-label": "cite.passage" },
    h("div", { class: "passage-head" }, this.number,
      h("span", { class: "passage-title", i18n: "cite.passage" }),
      h("button", { type: "button", class: "icon close-passage", "i18n-title": "cite.close",
        "i18n-aria-label": "cite.close", onclick: () => this.close() }, "✕")),
    this.file, this.meta, this.text);
    this.el.addEventListener("keydown", (e) => { if (e.key === "Escape") this.close(); });
  }

  open(passage, number) {
    this.number.textContent = `[${number}]`;
    this.file.textContent = passage.file_name;
    clear(this.meta);
    if (passage.page) {
      this.meta.append(tr(h("span", { class: "passage-page" }), "cite.page", null,
        { page: passage.page }));
    }
    if (passage.heading) this.meta.append(h("span", { class: "passage-heading" },
      passage.heading));
    this.text.textContent = passage.text;
    this.el.hidden = false;
    this.el.querySelector(".close-passage").focus();
  }

  close() {
    this.el.hidden = true;
  }
}
