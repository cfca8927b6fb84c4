// The knowledge-base list (#/kbs): the user's own and those shared with them, each with its
// visibility and owner; a form to create one (name, description, visibility, chunk size and
// overlap, embedding model); delete (owner or admin, after a confirmation).

import { ApiError, api } from "./api.js";
import { clear, h } from "./dom.js";
import { getLang, t, tr } from "./i18n.js";
import { showProblem } from "./documents.js";

const DEFAULT_CHUNK_SIZE = 500; // the server's defaults (docs/app-api.md)
const DEFAULT_OVERLAP = 80;
export const VISIBILITIES = ["private", "shared_read", "shared_write"];

/** The translated visibility of a knowledge base. */
export function visibilityLabel(visibility) {
  return h("span", { class: `visibility vis-${visibility}`, i18n: `kb.vis.${visibility}` });
}

/** Show the list of knowledge bases in `root` for the logged-in user `me`. */
export async function showKbList(root, me) {
  const message = h("p", { class: "form-message error", role: "alert" });
  const tbody = h("tbody");
  const table = h("table", { class: "kb-table" },
    h("thead", {}, h("tr", {},
      ["kb.name", "kb.visibility", "kb.owner", "kb.documents", "kb.created", null]
        .map((key) => h("th", key ? { i18n: key } : {})))),
    tbody);
  const empty = h("p", { class: "hint kb-empty", i18n: "kb.none", hidden: true });
  const form = createForm(message, async (kb) => { location.hash = `#/kbs/${kb.id}`; });
  clear(root).append(h("div", { class: "kb-page" },
    h("h2", { i18n: "kb.title" }), table, empty,
    h("h3", { i18n: "kb.create" }), form, message));

  async function load() {
    const kbs = await api("GET", "api/kbs");
    clear(tbody);
    empty.hidden = kbs.length > 0;
    for (const kb of kbs) tbody.append(row(kb));
  }

  function row(kb) {
    const mine = kb.owner_id === me.id;
    return h("tr", { class: "kb-row", "data-kb": kb.id, "data-name": kb.name },
      h("td", {}, h("a", { href: `#/kbs/${kb.id}`, class: "kb-link" }, kb.name),
        kb.description ? h("div", { class: "kb-description" }, kb.description) : null),
      h("td", {}, visibilityLabel(kb.visibility)),
      h("td", {}, mine ? h("span", { i18n: "kb.you" }) : kb.owner || "?"),
      h("td", { class: "num" }, kb.num_documents.toLocaleString(getLang())),
      h("td", {}, new Date(kb.created_at).toLocaleDateString(getLang())),
      h("td", { class: "actions" }, kb.can_manage
        ? h("button", { type: "button", class: "delete-kb", i18n: "chat.delete",
          onclick: () => remove(kb) })
        : null));
  }

  async function remove(kb) {
    if (!confirm(t("kb.confirmDelete", { name: kb.name }))) return;
    try {
      await api("DELETE", `api/kbs/${kb.id}`);
      showProblem(message, null);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblem(message, e);
    }
    await load();
  }

  await Promise.all([load(), fillModels(form.querySelector(".kb-model"))]);
  return { close() {} };
}

function createForm(message, onCreated) {
  const name = h("input", { type: "text", name: "name", required: true, maxlength: 200,
    "i18n-placeholder": "kb.name", "i18n-aria-label": "kb.name" });
  const description = h("input", { type: "text", name: "description", maxlength: 10000,
    "i18n-placeholder": "kb.description", "i18n-aria-label": "kb.description" });
  const visibility = h("select", { name: "visibility", "i18n-aria-label": "kb.visibility" },
    VISIBILITIES.map((v) => h("option", { value: v, i18n: `kb.vis.${v}` })));
  const chunkSize = h("input", { type: "number", name: "chunk_size", min: 50, max: 8000,
    value: DEFAULT_CHUNK_SIZE, required: true });
  const overlap = h("input", { type: "number", name: "overlap", min: 0, max: 4000,
    value: DEFAULT_OVERLAP, required: true });
  const model = h("select", { name: "embedding_model", class: "kb-model",
    "i18n-aria-label": "kb.embeddingModel" });
  const form = h("form", { class: "create-kb", onsubmit: async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), description: description.value.trim(),
      visibility: visibility.value, chunk_size: Number(chunkSize.value),
      overlap: Number(overlap.value) };
    if (model.value !== "*") body.embedding_model = model.value;
    if (body.overlap > body.chunk_size / 2) {
      tr(message, "kb.overlapTooLarge");
      return;
    }
    try {
      const kb = await api("POST", "api/kbs", body);
      showProblem(message, null);
      await onCreated(kb);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      showProblem(message, err);
    }
  } },
  h("div", { class: "row" }, name, description, visibility),
  h("div", { class: "row" },
    h("label", {}, h("span", { i18n: "kb.chunkSize" }), chunkSize),
    h("label", {}, h("span", { i18n: "kb.overlap" }), overlap),
    h("label", {}, h("span", { i18n: "kb.embeddingModel" }), model),
    h("button", { type: "submit", class: "primary", i18n: "kb.createButton" })),
  h("p", { class: "hint", i18n: "kb.splitHint" }));
  return form;
}

/** The embedding models on offer: the service's default first, then each, then keywords only. */
async function fillModels(select) {
  clear(select).append(h("option", { value: "*", i18n: "kb.modelDefault" }));
  try {
    const { models } = await api("GET", "api/embedding-models");
    for (const id of models) select.append(h("option", { value: id }, id));
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
  }
  select.append(h("option", { value: "", i18n: "kb.keywordsOnly" }));
}
