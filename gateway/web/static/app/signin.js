// Sign in (a session cookie, see gateway/web/session.py) or create an account first.
import { html, render, useState } from "./ui.js";
import { formValues, post, signIn } from "./api.js";
import { ErrorBox, Field } from "./components.js";

function nextPage() {
  const next = new URLSearchParams(location.search).get("next") || "/";
  // Only a path of this site: never "//elsewhere" or "https://...".
  return next.startsWith("/") && !next.startsWith("//") ? next : "/";
}

function SignIn() {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    const { email, password } = formValues(event.target);
    try {
      await signIn(email, password);
      location.assign(nextPage());
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  return html`<form class="panel" onSubmit=${submit} aria-labelledby="signin-title">
    <h1 id="signin-title">Sign in</h1>
    <${Field} label="Email" name="email" type="email" autocomplete="username" required />
    <${Field} label="Password" name="password" type="password" autocomplete="current-password"
      required minlength="8" />
    <${ErrorBox} error=${error} />
    <button type="submit" disabled=${busy}>Sign in</button>
  </form>`;
}

function SignUp() {
  const [error, setError] = useState(null);
  const [created, setCreated] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    const values = formValues(event.target);
    try {
      const account = await post("/api/auth/signup", values);
      await signIn(values.email, values.password);
      setCreated(account);
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  if (created) {
    return html`<section class="panel" aria-labelledby="created-title">
      <h2 id="created-title">Account created</h2>
      <p>You are signed in. Your first API key, for bots and the node agent, is shown this once:</p>
      <p><code class="secret" id="new-api-key">${created.api_key.key}</code></p>
      <p><a class="button" href=${created.user.role === "provider" ? "/provider" : nextPage() === "/" ? "/renter" : nextPage()}>Continue</a></p>
    </section>`;
  }
  return html`<form class="panel" onSubmit=${submit} aria-labelledby="signup-title">
    <h2 id="signup-title">Create an account</h2>
    <${Field} label="Email" name="email" type="email" autocomplete="username" required />
    <${Field} label="Password (8 characters or more)" name="password" type="password"
      autocomplete="new-password" required minlength="8" />
    <${Field} label="Full name (optional)" name="full_name" autocomplete="name" />
    <${Field} label="Organization (optional)" name="organization" autocomplete="organization" />
    <fieldset>
      <legend>I want to</legend>
      <div class="field check"><input type="radio" id="role-user" name="role" value="user" checked />
        <label for="role-user">rent memory (renter)</label></div>
      <div class="field check"><input type="radio" id="role-provider" name="role" value="provider" />
        <label for="role-provider">lend my machines' memory (provider)</label></div>
    </fieldset>
    <${ErrorBox} error=${error} />
    <button type="submit" disabled=${busy}>Create account</button>
  </form>`;
}

export function mount(main) {
  render(html`<div class="two"><${SignIn} /><${SignUp} /></div>`, main);
}
