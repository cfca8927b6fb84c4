// UI strings in English and Chinese. The language comes from localStorage, else the browser's.
// Elements show a string through `tr(el, key)`, which remembers the key in data-i18n, so a
// language switch re-translates the page in place (a streaming answer is not disturbed).

const STRINGS = {
  en: {
    "nav.chat": "Chat",
    "nav.admin": "Admin",
    "nav.logout": "Log out",
    "auth.login": "Log in",
    "auth.signup": "Sign up",
    "auth.username": "Username",
    "auth.password": "Password (at least 8 characters)",
    "auth.toSignup": "No account yet? Sign up",
    "auth.toLogin": "Have an account? Log in",
    "auth.firstAdmin": "The first account becomes the administrator.",
    "auth.signupClosed": "Sign-up is closed; ask an administrator for an account.",
    "chat.new": "New chat",
    "chat.search": "Search conversations",
    "chat.untitled": "New conversation",
    "chat.empty": "No conversations yet.",
    "chat.noMatch": "Nothing found.",
    "chat.rename": "Rename",
    "chat.delete": "Delete",
    "chat.confirmDelete": "Delete this conversation?",
    "chat.placeholder": "Send a message (Enter to send, Shift+Enter for a new line)",
    "chat.send": "Send",
    "chat.stop": "Stop",
    "chat.settings": "Settings",
    "chat.systemPrompt": "System prompt",
    "chat.temperature": "Temperature (empty: the model's default)",
    "chat.save": "Save",
    "chat.saved": "Saved.",
    "chat.cancel": "Cancel",
    "chat.model": "Model",
    "chat.modelDefault": "Default model",
    "chat.noModels": "no models",
    "chat.hello": "Ask anything.",
    "msg.copy": "Copy",
    "msg.copied": "Copied",
    "msg.edit": "Edit",
    "msg.saveSend": "Save and send",
    "msg.regenerate": "Regenerate",
    "msg.retry": "Retry",
    "msg.stopped": "Stopped.",
    "msg.you": "You",
    "msg.assistant": "Assistant",
    "code.copy": "Copy code",
    "status.waiting": "Waiting for the model…",
    "status.generating": "Generating…",
    "err.429": "The service is busy (too many requests). Try again in a moment.",
    "err.503": "The model service is unavailable right now (overloaded or loading).",
    "err.504": "The model service did not answer in time.",
    "err.502": "The model service can't be reached.",
    "err.500": "The model service failed while answering.",
    "err.network": "The connection was lost.",
    "err.other": "Something went wrong.",
    "admin.title": "Administration",
    "admin.signupOpen": "Anyone may sign up",
    "admin.addUser": "Add a user",
    "admin.add": "Add",
    "admin.role": "Role",
    "admin.roleUser": "user",
    "admin.roleAdmin": "admin",
    "admin.users": "Users",
    "admin.id": "ID",
    "admin.username": "Username",
    "admin.status": "Status",
    "admin.active": "active",
    "admin.disabled": "disabled",
    "admin.requests": "Requests",
    "admin.tokensIn": "Tokens in",
    "admin.tokensOut": "Tokens out",
    "admin.created": "Created",
    "admin.disable": "Disable",
    "admin.enable": "Enable",
    "admin.makeAdmin": "Make admin",
    "admin.makeUser": "Make user",
    "admin.added": "Added {name}.",
  },
  zh: {
    "nav.chat": "对话",
    "nav.admin": "管理",
    "nav.logout": "退出登录",
    "auth.login": "登录",
    "auth.signup": "注册",
    "auth.username": "用户名",
    "auth.password": "密码（至少 8 个字符）",
    "auth.toSignup": "还没有账号？注册",
    "auth.toLogin": "已有账号？登录",
    "auth.firstAdmin": "第一个注册的账号将成为管理员。",
    "auth.signupClosed": "注册已关闭，请联系管理员开通账号。",
    "chat.new": "新对话",
    "chat.search": "搜索对话",
    "chat.untitled": "新对话",
    "chat.empty": "还没有对话。",
    "chat.noMatch": "没有找到。",
    "chat.rename": "重命名",
    "chat.delete": "删除",
    "chat.confirmDelete": "删除这个对话？",
    "chat.placeholder": "输入消息（Enter 发送，Shift+Enter 换行）",
    "chat.send": "发送",
    "chat.stop": "停止",
    "chat.settings": "设置",
    "chat.systemPrompt": "系统提示词",
    "chat.temperature": "温度（留空：使用模型默认值）",
    "chat.save": "保存",
    "chat.saved": "已保存。",
    "chat.cancel": "取消",
    "chat.model": "模型",
    "chat.modelDefault": "默认模型",
    "chat.noModels": "没有模型",
    "chat.hello": "有什么可以帮你？",
    "msg.copy": "复制",
    "msg.copied": "已复制",
    "msg.edit": "编辑",
    "msg.saveSend": "保存并发送",
    "msg.regenerate": "重新生成",
    "msg.retry": "重试",
    "msg.stopped": "已停止。",
    "msg.you": "你",
    "msg.assistant": "助手",
    "code.copy": "复制代码",
    "status.waiting": "正在等待模型…",
    "status.generating": "正在生成…",
    "err.429": "服务繁忙（请求过多），请稍后再试。",
    "err.503": "模型服务暂时不可用（过载或正在加载模型）。",
    "err.504": "模型服务没有及时响应。",
    "err.502": "无法连接模型服务。",
    "err.500": "模型服务在回答时出错。",
    "err.network": "连接已断开。",
    "err.other": "出错了。",
    "admin.title": "管理",
    "admin.signupOpen": "允许任何人注册",
    "admin.addUser": "添加用户",
    "admin.add": "添加",
    "admin.role": "角色",
    "admin.roleUser": "普通用户",
    "admin.roleAdmin": "管理员",
    "admin.users": "用户",
    "admin.id": "ID",
    "admin.username": "用户名",
    "admin.status": "状态",
    "admin.active": "正常",
    "admin.disabled": "已停用",
    "admin.requests": "请求数",
    "admin.tokensIn": "输入 token",
    "admin.tokensOut": "输出 token",
    "admin.created": "创建时间",
    "admin.disable": "停用",
    "admin.enable": "启用",
    "admin.makeAdmin": "设为管理员",
    "admin.makeUser": "设为普通用户",
    "admin.added": "已添加 {name}。",
  },
};

export const LANGS = Object.keys(STRINGS);
const STORAGE_KEY = "surge.lang";
let lang = initialLang();

function initialLang() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && STRINGS[saved]) return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function getLang() {
  return lang;
}

/** The string `key` in the current language, `{name}` placeholders filled from `vars`. */
export function t(key, vars = {}) {
  const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

/** Show `key` in `el` (as its text, or as the attribute `attr`) and keep it translated. */
export function tr(el, key, attr = null) {
  if (attr) {
    el.setAttribute(`data-i18n-${attr}`, key);
    el.setAttribute(attr, t(key));
  } else {
    el.setAttribute("data-i18n", key);
    el.textContent = t(key);
  }
  return el;
}

const ATTRS = ["placeholder", "title", "aria-label"];

/** Re-translate every element under `root` that was shown through `tr`. */
export function translate(root = document) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.getAttribute("data-i18n"));
  }
  for (const attr of ATTRS) {
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) {
      el.setAttribute(attr, t(el.getAttribute(`data-i18n-${attr}`)));
    }
  }
}

/** Switch the language, remember it, and re-translate the page. */
export function setLang(next) {
  if (!STRINGS[next]) return;
  lang = next;
  localStorage.setItem(STORAGE_KEY, next);
  translate();
}
