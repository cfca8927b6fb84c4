// The admin page: sign-up on/off, the rewriting of knowledge-base follow-ups on/off, add a
// user, and every user with their usage (requests, tokens in and out), disable/enable and role.

import { ApiError, api } from "./api.js";
import { clear, h } from "./dom.js";
import { getLang, t, tr } from "./i18n.js";

/** Show the admin page in `root` for the logged-in admin `me`. */
export async function showAdmin(root, me) {
  const message = h("p", { class: "form-message", role: "status" });
  const signup = h("input", { type: "checkbox", class: "signup-open", onchange: async () => {
    await guarded(message, () => api("PUT", "api/admin/settings",
      { signup_open: signup.checked }));
  } });
  const rewrite = h("input", { type: "checkbox", class: "rewrite-queries", onchange: async () => {
    await guarded(message, () => api("PUT", "api/admin/settings",
      { rewrite_queries: rewrite.checked }));
  } });
  const tbody = h("tbody");
  const username = h("input", { type: "text", name: "username", required: true,
    autocomplete: "off", "i18n-placeholder": "admin.username" });
  const password = h("input", { type: "password", name: "password", required: true,
    minlength: 8, autocomplete: "new-password", "i18n-placeholder": "auth.password" });
  const role = h("select", { name: "role" },
    h("option", { value: "user", i18n: "admin.roleUser" }),
    h("option", { value: "admin", i18n: "admin.roleAdmin" }));
  const addForm = h("form", { class: "add-user row", onsubmit: async (e) => {
    e.preventDefault();
    const name = username.value;
    const ok = await guarded(message, () => api("POST", "api/admin/users",
      { username: name, password: password.value, role: role.value }));
    if (ok) {
      message.removeAttribute("data-i18n");
      message.textContent = t("admin.added", { name });
      addForm.reset();
      await load();
    }
  } }, username, password, role, h("button", { type: "submit", class: "primary",
    i18n: "admin.add" }));

  const columns = ["admin.id", "admin.username", "admin.role", "admin.status", "admin.requests",
    "admin.tokensIn", "admin.tokensOut", "admin.created", null];
  const table = h("table", { class: "users" },
    h("thead", {}, h("tr", {}, columns.map((key) => h("th", key ? { i18n: key } : {})))),
    tbody);

  clear(root).append(h("div", { class: "admin" },
    h("h2", { i18n: "admin.title" }),
    h("label", { class: "toggle" }, signup, h("span", { i18n: "admin.signupOpen" })),
    h("label", { class: "toggle" }, rewrite, h("span", { i18n: "admin.rewriteQueries" })),
    h("h3", { i18n: "admin.addUser" }), addForm, message,
    h("h3", { i18n: "admin.users" }), table));

  async function load() {
    const [settings, users] = await Promise.all([
      api("GET", "api/admin/settings"), api("GET", "api/admin/users")]);
    signup.checked = settings.signup_open;
    rewrite.checked = settings.rewrite_queries;
    clear(tbody);
    for (const user of users) tbody.append(row(user));
  }

  function row(user) {
    const self = user.id === me.id;
    const patch = (fields) => async () => {
      if (await guarded(message, () => api("PATCH", `api/admin/users/${user.id}`, fields))) {
        await load();
      }
    };
    const number = (n) => h("td", { class: "num" }, n.toLocaleString(getLang()));
    return h("tr", { "data-user": user.username, class: user.disabled ? "disabled" : null },
      h("td", { class: "num" }, String(user.id)),
      h("td", {}, user.username),
      h("td", { i18n: user.role === "admin" ? "admin.roleAdmin" : "admin.roleUser" }),
      h("td", { i18n: user.disabled ? "admin.disabled" : "admin.active" }),
      number(user.num_requests), number(user.num_tokens_in), number(user.num_tokens_out),
      h("td", {}, new Date(user.created_at).toLocaleDateString(getLang())),
      h("td", { class: "actions" }, self ? null : [
        h("button", { type: "button", class: "toggle-disabled",
          i18n: user.disabled ? "admin.enable" : "admin.disable",
          onclick: patch({ disabled: !user.disabled }) }),
        h("button", { type: "button", class: "toggle-role",
          i18n: user.role === "admin" ? "admin.makeUser" : "admin.makeAdmin",
          onclick: patch({ role: user.role === "admin" ? "user" : "admin" }) }),
      ]));
  }

  await load();
}

/** Run `call`; show its error in `message` (true when it worked). */
async function guarded(message, call) {
  try {
    await call();
    tr(message, "chat.saved");
    message.classList.remove("error");
    return true;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    message.removeAttribute("data-i18n");
    message.textContent = e.message;
    message.classList.add("error");
    return false;
  }
}
