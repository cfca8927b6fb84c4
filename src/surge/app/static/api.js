// The app's REST API as the page uses it: JSON calls with the CSRF token, and streamed answers
// (SSE over a fetch, so a Stop can abort it: the server then closes the model's request).

let csrfToken = null;
let onLoggedOut = () => {};

/** Remember the session's CSRF token (from /api/login, /api/signup, /api/me). */
export function setCsrf(token) {
  csrfToken = token;
}

/** Called when a request finds the session gone (401): the page shows the log-in form. */
export function setOnLoggedOut(callback) {
  onLoggedOut = callback;
}

/** An error answer of the app: its HTTP status, code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(method, json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  if (method !== "GET" && csrfToken) out["X-CSRF-Token"] = csrfToken;
  return out;
}

async function errorOf(resp) {
  let code = "http_error";
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    } else if (body.detail) {
      message = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, code, message);
}

/** `method path` with an optional JSON body; the decoded JSON answer (null for 204). */
export async function api(method, path, body = undefined) {
  const resp = await fetch(path, {
    method,
    headers: headers(method, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401 && !path.endsWith("/login")) onLoggedOut();
    throw error;
  }
  return resp.status === 204 ? null : resp.json();
}

/** Upload `files` (a FileList or array of File) as multipart `files` to `path`; the decoded JSON
 * answer. Rejects with ApiError (e.g. 413 for an upload over the app's limit). */
export async function upload(path, files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const resp = await fetch(path, {
    method: "POST",
    headers: headers("POST", false),
    body: form,
    credentials: "same-origin",
  });
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401) onLoggedOut();
    throw error;
  }
  return resp.json();
}

/**
 * Stream an answer: `onEvent` gets each event ({type: "start"|"status"|"delta"|"done"|"error"}).
 * Resolves when the stream ends; rejects with ApiError (refused before streaming), or an
 * AbortError when `signal` aborts (the user pressed Stop), or a TypeError (connection lost).
 */
export async function streamAnswer(method, path, body, signal, onEvent) {
  const resp = await fetch(path, {
    method,
    headers: headers(method, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    signal,
  });
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401) onLoggedOut();
    throw error;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}
