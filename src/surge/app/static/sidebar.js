// The conversation list: newest first, searchable (titles and messages), each with rename and
// delete.

import { api } from "./api.js";
import { clear, h } from "./dom.js";
import { t, tr } from "./i18n.js";

const SEARCH_DELAY_MS = 250;

/** The sidebar's element and `refresh(activeId)`; the callbacks say what happened. */
export function renderSidebar({ onNew, onDeleted, onRenamed }) {
  let activeId = null;
  let timer = null;
  let generation = 0; // answers to an older search are dropped
  const list = h("ul", { class: "conv-list" });
  const search = h("input", { type: "search", class: "conv-search", "i18n-placeholder":
    "chat.search", "i18n-aria-label": "chat.search", oninput: () => {
    clearTimeout(timer);
    timer = setTimeout(() => refresh(activeId), SEARCH_DELAY_MS);
  } });
  const el = h("aside", { class: "sidebar" },
    h("button", { type: "button", class: "new-chat primary", i18n: "chat.new", onclick: onNew }),
    search, list);

  async function refresh(id) {
    activeId = id;
    const mine = ++generation;
    const q = search.value.trim();
    const path = q ? `api/conversations?q=${encodeURIComponent(q)}` : "api/conversations";
    const conversations = await api("GET", path);
    if (mine !== generation) return null;
    clear(list);
    if (!conversations.length) {
      list.append(h("li", { class: "conv-empty", i18n: q ? "chat.noMatch" : "chat.empty" }));
    }
    for (const conv of conversations) list.append(item(conv));
    return conversations;
  }

  function item(conv) {
    const link = h("a", { href: `#/c/${conv.id}`, class: "conv-link" });
    showTitle(link, conv.title);
    const li = h("li", { class: conv.id === activeId ? "conv active" : "conv",
      "data-id": conv.id }, link,
    h("button", { type: "button", class: "icon rename", "i18n-title": "chat.rename",
      "i18n-aria-label": "chat.rename", onclick: () => rename(li, link, conv) }, "✎"),
    h("button", { type: "button", class: "icon delete", "i18n-title": "chat.delete",
      "i18n-aria-label": "chat.delete", onclick: () => remove(conv) }, "✕"));
    return li;
  }

  function rename(li, link, conv) {
    const input = h("input", { type: "text", class: "rename-input", maxlength: 200 });
    input.value = conv.title;
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== conv.title) {
        const updated = await api("PATCH", `api/conversations/${conv.id}`, { title });
        onRenamed(updated);
      }
      await refresh(activeId);
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.isComposing) finish(true);
      if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
    link.replaceWith(input);
    input.focus();
    input.select();
  }

  async function remove(conv) {
    if (!confirm(t("chat.confirmDelete"))) return;
    await api("DELETE", `api/conversations/${conv.id}`);
    onDeleted(conv.id);
    await refresh(activeId === conv.id ? null : activeId);
  }

  return { el, refresh };
}

function showTitle(el, title) {
  if (title) el.textContent = title;
  else tr(el, "chat.untitled");
}
