// Shared by every console page: the JWT (sessionStorage only), fetch with error
// handling, safe DOM building (textContent only, never innerHTML) and formatting.

const page = document.body.dataset;
export const API = page.api;
export const CONSOLE = page.console;
export const SIGNIN = page.signin;

const TOKEN_KEY = "mailkey.jwt";
const NEXT_KEY = "mailkey.next";
const FLASH_KEY = "mailkey.flash";
export const PROVIDER_KEY = "mailkey.oauth_provider";

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  set: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
  takeNext: () => {
    const next = sessionStorage.getItem(NEXT_KEY);
    sessionStorage.removeItem(NEXT_KEY);
    return next && next.startsWith(CONSOLE) ? next : CONSOLE;
  },
  flash: (text) => sessionStorage.setItem(FLASH_KEY, text),
  takeFlash: () => {
    const text = sessionStorage.getItem(FLASH_KEY);
    sessionStorage.removeItem(FLASH_KEY);
    return text;
  },
};

export class ApiError extends Error {
  constructor(status, code, message, detail = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

// fetch + JSON + the API's error envelope. Resolves to the body (or {status, data}).
export async function request(url, { method = "GET", query, json, auth = true, withStatus = false } = {}) {
  const target = new URL(url, location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, value);
  }
  const headers = { Accept: "application/json" };
  if (auth) {
    const token = session.token();
    if (!token) throw new ApiError(401, "unauthorized", "You are not signed in.");
    headers.Authorization = `Bearer ${token}`;
  }
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(target, init);
  } catch {
    throw new ApiError(0, "network", "Mailkey could not be reached. Check the server and your connection, then try again.");
  }
  let data = null;
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = data && typeof data.error === "object" && data.error ? data.error : {};
    const message = typeof error.message === "string" ? error.message
      : `The server answered HTTP ${response.status} with no explanation.`;
    if (response.status === 401 && auth) session.clear();
    throw new ApiError(response.status, error.code || `http_${response.status}`, message, error);
  }
  if (data === null && response.status !== 204) {
    throw new ApiError(response.status, "bad_response", "The server's answer was not JSON.");
  }
  return withStatus ? { status: response.status, data } : data;
}

export const api = (path, options) => request(API + path, options);

// One line for any error: the API's message, plus field messages of a validation error.
export function describe(error) {
  if (!(error instanceof ApiError)) return `Unexpected error in the console: ${error && error.message ? error.message : error}`;
  const fields = error.detail && error.detail.fields;
  if (fields && typeof fields === "object") {
    const parts = Object.entries(fields).map(([name, messages]) => `${name}: ${[].concat(messages).join(", ")}`);
    if (parts.length) return `${error.message} (${parts.join("; ")})`;
  }
  return error.message;
}

// DOM building: attributes via setAttribute, text via text nodes. No HTML parsing anywhere.
export function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (typeof value === "function") node.addEventListener(key.replace(/^on/, ""), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// A status line: progress, success, error or info, in words.
export function say(target, kind, text, ...extra) {
  target.replaceChildren(el("span", {}, text), ...extra);
  target.className = `${target.className.replace(/\s*\bis-\w+/g, "")} is-${kind}`.trim();
  target.setAttribute("role", kind === "error" ? "alert" : "status");
  target.hidden = false;
}

export const notice = document.getElementById("notice");

export function sayError(target, error) {
  const extra = error instanceof ApiError && error.status === 401
    ? [" ", el("a", { href: SIGNIN }, "Sign in again")] : [];
  say(target, "error", describe(error), ...extra);
}

// Run a long action: the button is disabled and the line shows progress until it ends
// in a message. `work(progress)` returns the success text (or [kind, text]).
export async function runAction(button, target, progressText, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  say(target, "progress", progressText);
  try {
    const result = await work((text) => say(target, "progress", text));
    const [kind, text] = Array.isArray(result) ? result : ["success", result];
    if (text) say(target, kind, text);
    return true;
  } catch (error) {
    sayError(target, error);
    return false;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// Start connecting a mailbox: remember the provider for the completion page, then go.
export async function beginConnect(provider, loginHint) {
  sessionStorage.setItem(PROVIDER_KEY, provider);
  const start = await api(`/oauth/login/${encodeURIComponent(provider)}`, {
    query: { response: "json", login_hint: loginHint },
  });
  const target = new URL(start.authorization_url);
  if (target.protocol !== "https:" && target.protocol !== "http:") {
    throw new ApiError(0, "bad_response", "The provider's address is not a web address.");
  }
  location.assign(target.href);
}

// Every signed-in page starts here: no token → sign-in page; then the header.
export async function start() {
  if (!session.token()) {
    sessionStorage.setItem(NEXT_KEY, location.pathname + location.search);
    location.replace(SIGNIN);
    return new Promise(() => {});
  }
  let me;
  try {
    me = await api("/me");
  } catch (error) {
    if (error.status === 401) {
      session.flash(`Your session ended: ${error.message}. Sign in again.`);
      sessionStorage.setItem(NEXT_KEY, location.pathname + location.search);
      location.replace(SIGNIN);
      return new Promise(() => {});
    }
    sayError(notice, error);
    throw error;
  }
  const who = document.getElementById("who");
  if (who) {
    const admin = me.roles.includes("admin") ? " · admin" : "";
    document.getElementById("who-text").textContent = `user ${me.user_id} · org ${me.organization_id}${admin}`;
    document.getElementById("signout").addEventListener("click", () => {
      session.clear();
      sessionStorage.removeItem(PROVIDER_KEY);
      location.assign(SIGNIN);
    });
    who.hidden = false;
  }
  return me;
}

// Formatting.
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

export function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : dateFormat.format(date);
}

export function fmtRelative(iso) {
  if (!iso) return "";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  const steps = [[60, "second"], [3600, "minute"], [86400, "hour"], [Infinity, "day"]];
  const divisors = { second: 1, minute: 60, hour: 3600, day: 86400 };
  const [, unit] = steps.find(([limit]) => Math.abs(seconds) < limit);
  return relative.format(Math.round(seconds / divisors[unit]), unit);
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export function fmtBytes(size) {
  if (size === null || size === undefined) return "—";
  const units = ["B", "KB", "MB", "GB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export const fmtPercent = (rate) => (rate === null || rate === undefined ? "—" : `${(rate * 100).toFixed(1)} %`);

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
