// The API as the browser speaks it: JSON over fetch with the session cookie (sent by the
// browser, never readable here) and the session's CSRF token on every change; /ws for live
// updates. Money: the API's USD numbers are shown; the exact integer pico-USD twins are for
// bots (JavaScript numbers lose integers beyond 2^53).

let session = { signed_in: false };

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_" + status;
    this.field = error.field || null;
  }
}

function clean(query) {
  const out = {};
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") out[k] = String(v);
  }
  return out;
}

export async function api(method, path, { body, query, idempotent } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && method !== "HEAD" && session.csrf_token) {
    headers["X-CSRF-Token"] = session.csrf_token;
  }
  if (idempotent) headers["Idempotency-Key"] = crypto.randomUUID();
  const q = new URLSearchParams(clean(query)).toString();
  const response = await fetch(q ? `${path}?${q}` : path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path, query) => api("GET", path, { query });
export const post = (path, body = {}, options = {}) => api("POST", path, { body, ...options });
export const del = (path) => api("DELETE", path);

export async function loadSession() {
  try {
    session = await get("/api/web/session");
  } catch {
    session = { signed_in: false };
  }
  return session;
}

export function currentSession() {
  return session;
}

export async function signIn(email, password) {
  session = await post("/api/web/login", { email, password });
  return session;
}

export async function signOut() {
  try {
    await post("/api/web/logout");
  } finally {
    session = { signed_in: false };
  }
}

// ------------------------------------------------------------------------------------------
// /ws: one socket per page (/ws with the session cookie when signed in, /ws/public otherwise),
// channels subscribed on demand and again after every reconnect. Pub/sub is at most once, so
// `onReconnect` handlers re-read the current state over REST.

class Live {
  constructor() {
    this.handlers = new Map();
    this.reconnectHandlers = new Set();
    this.statusHandlers = new Set();
    this.socket = null;
    this.retry = 0;
    this.status = "connecting";
    this.connected = false;
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const path = session.signed_in ? "/ws" : "/ws/public";
    return `${scheme}//${location.host}${path}?batch=1`;
  }

  start() {
    if (this.socket) return;
    const socket = new WebSocket(this.url());
    this.socket = socket;
    socket.onopen = () => {
      const wasConnected = this.connected;
      this.connected = true;
      this.retry = 0;
      this.setStatus("live");
      if (this.handlers.size) this.send({ op: "subscribe", channels: [...this.handlers.keys()] });
      if (wasConnected) this.reconnectHandlers.forEach((fn) => fn());
    };
    socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    socket.onclose = () => {
      this.socket = null;
      this.setStatus("reconnecting");
      const delay = Math.min(30000, 500 * 2 ** this.retry++) * (0.8 + Math.random() * 0.4);
      setTimeout(() => this.start(), delay);
    };
  }

  setStatus(status) {
    this.status = status;
    this.statusHandlers.forEach((fn) => fn(status));
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  receive(message) {
    if (message.type === "batch") {
      message.messages.forEach((m) => this.receive(m));
    } else if (message.type === "event") {
      (this.handlers.get(message.channel) || new Set()).forEach((fn) => fn(message.data));
    } else if (message.type === "error") {
      console.warn("ws:", message.channel || "", message.error.code, message.error.message);
    }
  }

  // Call `fn(data)` for every event of `channel`; returns the function that stops it.
  on(channel, fn) {
    let set = this.handlers.get(channel);
    if (!set) {
      set = new Set();
      this.handlers.set(channel, set);
      this.send({ op: "subscribe", channels: [channel] });
    }
    set.add(fn);
    this.start();
    return () => {
      set.delete(fn);
      if (!set.size) {
        this.handlers.delete(channel);
        this.send({ op: "unsubscribe", channels: [channel] });
      }
    };
  }

  onReconnect(fn) {
    this.reconnectHandlers.add(fn);
    return () => this.reconnectHandlers.delete(fn);
  }

  onStatus(fn) {
    this.statusHandlers.add(fn);
    fn(this.status);
    return () => this.statusHandlers.delete(fn);
  }
}

export const live = new Live();

// A handler that gathers what arrives and hands it to `fn` as one list per animation frame (a
// second when the tab is hidden): at 100 fills a second the page renders once a frame, not once
// a fill, and a busy machine just makes the batches bigger.
export function perFrame(fn) {
  let pending = [];
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    const batch = pending;
    pending = [];
    fn(batch);
  };
  return (item) => {
    pending.push(item);
    if (!scheduled) {
      scheduled = true;
      if (document.hidden) setTimeout(flush, 1000);
      else requestAnimationFrame(flush);
    }
  };
}

// ------------------------------------------------------------------------------------------
// Formatting

export function price(usdPerGbSec) {
  // Per-GB-second prices are millionths of a dollar: nine decimals show them whole.
  if (usdPerGbSec === null || usdPerGbSec === undefined) return "–";
  return "$" + usdPerGbSec.toFixed(9);
}

export function usd(amount) {
  if (amount === null || amount === undefined) return "–";
  const digits = Math.abs(amount) >= 1 ? 2 : Math.abs(amount) >= 0.01 ? 4 : 6;
  return "$" + amount.toFixed(digits);
}

export function gb(n) {
  return `${Number(n).toLocaleString("en-US")} GB`;
}

export function duration(sec) {
  sec = Math.max(0, Math.round(sec));
  const d = Math.floor(sec / 86400);
  const h = Math.floor((sec % 86400) / 3600);
  const m = Math.floor((sec % 3600) / 60);
  const s = sec % 60;
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

export function clock(ms) {
  return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
}

export function when(ms) {
  return new Date(ms).toLocaleString("en-GB", { hour12: false });
}

export function pct(x) {
  return x === null || x === undefined ? "–" : `${Number(x).toFixed(1)}%`;
}

// A form's fields as an object: numbers for type=number inputs, booleans for checkboxes,
// nothing for empty fields (so the API's defaults apply).
export function formValues(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled) continue;
    if (el.type === "checkbox") out[el.name] = el.checked;
    else if (el.type === "radio" && !el.checked) continue;
    else if (el.value === "") continue;
    else if (el.type === "number") out[el.name] = Number(el.value);
    else out[el.name] = el.value;
  }
  return out;
}

export function errorText(error) {
  if (error instanceof ApiError) {
    return error.field ? `${error.message} (${error.field})` : error.message;
  }
  return String((error && error.message) || error);
}
