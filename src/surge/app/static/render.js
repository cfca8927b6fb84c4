// Markdown answers: marked turns the text into HTML, DOMPurify removes anything that could run
// (scripts, event handlers, javascript: URLs, forms, frames), and only then does it enter the
// page. highlight.js colours code blocks; each gets a copy button.

import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";
import { marked } from "./vendor/marked.esm.js";
import { copyText, h } from "./dom.js";
import { t } from "./i18n.js";

marked.use({ gfm: true, breaks: false });

const PURIFY = {
  USE_PROFILE: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
};

// links from an answer open in a new tab and tell the target nothing about this page
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Sanitized HTML of a markdown text (a string safe to assign to innerHTML). */
export function markdownToSafeHtml(text) {
  return DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
}

/** Render `text` as markdown into `el`; `final` adds code highlighting and copy buttons (left
 * out while an answer streams in: it is redone at every update). */
export function renderMarkdown(el, text, final = true) {
  el.innerHTML = markdownToSafeHtml(text);
  if (final) decorateCode(el);
}

function decorateCode(el) {
  for (const code of el.querySelectorAll("pre > code")) {
    hljs.highlightElement(code);
    const pre = code.parentElement;
    const button = h("button", {
      type: "button",
      class: "copy-code",
      i18n: "code.copy",
      onclick: async () => {
        if (await copyText(code.textContent)) flash(button, "msg.copied");
      },
    });
    pre.prepend(button);
  }
}

/** Show `key` on `button` for a moment, then its own text again. */
export function flash(button, key) {
  const own = button.getAttribute("data-i18n");
  button.textContent = t(key);
  setTimeout(() => {
    button.textContent = t(own);
  }, 1200);
}
