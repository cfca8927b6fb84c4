// A small helper to build elements without innerHTML (text always goes in as text).

import { tr } from "./i18n.js";

/**
 * h("button", {class: "x", onclick: fn, i18n: "chat.send"}, child, ...): an element.
 * Attributes: `class`, `on*` (listeners), `i18n` (translated text, see i18n.tr), `i18n-<attr>`
 * (a translated attribute), booleans (set when true), anything else as a string attribute.
 * Children: nodes, strings (as text), null/false (skipped), arrays of those.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "i18n") {
      tr(el, value);
    } else if (name.startsWith("i18n-")) {
      tr(el, value, name.slice(5));
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Remove every child of `el`. */
export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

/** Copy text to the clipboard (the Clipboard API where the page is a secure context, else the
 * old execCommand way, e.g. over plain http on a LAN address). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the old way (e.g. permission refused)
    }
  }
  const area = h("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  return ok;
}
