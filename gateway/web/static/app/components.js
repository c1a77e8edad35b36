// Small shared pieces: labelled fields, error and status messages, the live badge.
import { html, useEffect, useState } from "./ui.js";
import { live, errorText } from "./api.js";

let fieldCount = 0;

// A labelled input: every control of the app has a visible label tied to it.
export function Field({ label, name, type = "text", hint, children, ...rest }) {
  const [id] = useState(() => `f${++fieldCount}`);
  const hintId = hint ? `${id}-hint` : undefined;
  const control = children
    ? html`<select id=${id} name=${name} aria-describedby=${hintId} ...${rest}>${children}</select>`
    : html`<input id=${id} name=${name} type=${type} aria-describedby=${hintId} ...${rest} />`;
  if (type === "checkbox") {
    return html`<div class="field check">${control}<label for=${id}>${label}</label>
      ${hint && html`<small id=${hintId}>${hint}</small>`}</div>`;
  }
  return html`<div class="field"><label for=${id}>${label}</label>${control}
    ${hint && html`<small id=${hintId}>${hint}</small>`}</div>`;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<p class="error" role="alert">${errorText(error)}</p>`;
}

export function Notice({ children }) {
  if (!children) return null;
  return html`<p class="notice" role="status">${children}</p>`;
}

export function LiveBadge() {
  const [status, setStatus] = useState(live.status);
  useEffect(() => live.onStatus(setStatus), []);
  return html`<span class=${"badge " + status} role="status" aria-live="polite">
    ${status === "live" ? "● live" : status}</span>`;
}

// Pages that need a signed-in account of some role say so instead of failing.
export function NeedsAccount({ session, roles, what }) {
  const next = encodeURIComponent(location.pathname);
  if (!session.signed_in) {
    return html`<section class="panel"><h1>${what}</h1>
      <p>Sign in to use this page.</p>
      <p><a class="button" href=${"/signin?next=" + next}>Sign in or create an account</a></p>
    </section>`;
  }
  if (!roles.includes(session.user.role)) {
    return html`<section class="panel"><h1>${what}</h1>
      <p>This page is for ${roles.filter((r) => r !== "admin").join(" or ")} accounts; you are
        signed in as a ${session.user.role}.</p></section>`;
  }
  return null;
}

// Run `load` now and whenever `deps` change; [data, error, reload].
export function useLoad(load, deps = []) {
  const [state, setState] = useState({ data: null, error: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let alive = true;
    load().then(
      (data) => alive && setState({ data, error: null }),
      (error) => alive && setState((s) => ({ data: s.data, error })),
    );
    return () => {
      alive = false;
    };
  }, [...deps, tick]);
  return [state.data, state.error, () => setTick((t) => t + 1)];
}

// Re-render every `ms` (live remaining times, accrued costs).
export function useNow(ms = 1000) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(timer);
  }, [ms]);
  return now;
}
