// The page: who is logged in, the routes (#/ new chat, #/c/ID a conversation, #/kbs the
// knowledge bases, #/kbs/ID one of them, #/admin), the log-in and sign-up form, the top bar
// (language, log-out).

import { showAdmin } from "./admin.js";
import { ApiError, api, setCsrf, setOnLoggedOut } from "./api.js";
import { showChat } from "./chat.js";
import { clear, h } from "./dom.js";
import { getLang, setLang, translate } from "./i18n.js";
import { showKb } from "./kb.js";
import { showKbList } from "./kbs.js";

const view = document.getElementById("view");
const nav = document.querySelector(".nav");
const adminLink = document.querySelector(".admin-link");
const whoami = document.querySelector(".whoami");
const logoutButton = document.querySelector(".logout");
const langSelect = document.querySelector(".lang-select");

let me = null; // the logged-in user
let chat = null; // the chat page shown, if any
let page = null; // the page shown (its close() stops what it follows in the background)
let routing = 0; // a page that finishes loading after the next route started is closed

function enter(session) {
  me = session.user;
  setCsrf(session.csrf_token);
  nav.hidden = false;
  adminLink.hidden = me.role !== "admin";
  whoami.hidden = false;
  whoami.textContent = me.username;
  logoutButton.hidden = false;
}

function leave() {
  me = null;
  chat = null;
  page?.close?.();
  page = null;
  setCsrf(null);
  nav.hidden = true;
  whoami.hidden = true;
  logoutButton.hidden = true;
  showAuth("login");
}

async function route() {
  if (!me) return;
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/c\/(\d+)$/);
  const kbMatch = hash.match(/^#\/kbs\/(\d+)$/);
  if (match && chat && chat.conversationId === Number(match[1])) return; // already shown
  page?.close?.();
  page = null;
  chat = null;
  const mine = ++routing;
  let shown;
  let isChat = false;
  if (hash === "#/admin" && me.role === "admin") {
    shown = await showAdmin(view, me);
  } else if (hash === "#/kbs") {
    shown = await showKbList(view, me);
  } else if (kbMatch) {
    shown = await showKb(view, Number(kbMatch[1]));
  } else {
    shown = await showChat(view, match ? Number(match[1]) : null);
    isChat = true;
  }
  if (mine !== routing) {
    shown?.close?.();
    return;
  }
  page = shown;
  if (isChat) chat = shown;
  const section = hash.startsWith("#/kbs") ? "#/kbs" : hash === "#/admin" ? "#/admin" : "#/";
  for (const a of nav.querySelectorAll("a")) {
    a.classList.toggle("active", a.getAttribute("href") === section);
  }
}

async function showAuth(mode) {
  let signupOpen = true;
  try {
    signupOpen = (await api("GET", "api/settings")).signup_open;
  } catch {
    // keep the form usable; the server says no if sign-up is closed
  }
  if (mode === "signup" && !signupOpen) mode = "login";
  const message = h("p", { class: "form-message error", role: "alert" });
  const username = h("input", { type: "text", name: "username", required: true,
    autocomplete: "username", "i18n-placeholder": "auth.username", "i18n-aria-label":
    "auth.username" });
  const password = h("input", { type: "password", name: "password", required: true,
    minlength: 8, autocomplete: mode === "signup" ? "new-password" : "current-password",
    "i18n-placeholder": "auth.password", "i18n-aria-label": "auth.password" });
  const form = h("form", { class: `auth-form ${mode}`, onsubmit: async (e) => {
    e.preventDefault();
    try {
      const body = { username: username.value, password: password.value };
      enter(await api("POST", mode === "signup" ? "api/signup" : "api/login", body));
      await route();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      message.textContent = err.message;
    }
  } },
  h("h2", { i18n: mode === "signup" ? "auth.signup" : "auth.login" }),
  username, password,
  h("button", { type: "submit", class: "primary", i18n: mode === "signup" ? "auth.signup"
    : "auth.login" }),
  message,
  mode === "signup" ? h("p", { class: "hint", i18n: "auth.firstAdmin" }) : null,
  signupOpen || mode === "signup"
    ? h("a", { href: "#", class: "switch-auth", i18n: mode === "signup" ? "auth.toLogin"
      : "auth.toSignup", onclick: (e) => {
      e.preventDefault();
      showAuth(mode === "signup" ? "login" : "signup");
    } })
    : h("p", { class: "hint", i18n: "auth.signupClosed" }));
  clear(view).append(h("div", { class: "auth" }, form));
  username.focus();
}

async function start() {
  langSelect.value = getLang();
  translate();
  langSelect.addEventListener("change", () => setLang(langSelect.value));
  logoutButton.addEventListener("click", async () => {
    try {
      await api("POST", "api/logout");
    } finally {
      leave();
    }
  });
  setOnLoggedOut(() => { if (me) leave(); });
  window.addEventListener("hashchange", () => route());
  try {
    enter(await api("GET", "api/me"));
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) throw e;
    leave();
    return;
  }
  await route();
}

start();
