// Every page: find out who is signed in, show it in the header, then mount the page's module
// (`<body data-page="...">` names it) into <main>.
import { html, render } from "./ui.js";
import { loadSession, signOut } from "./api.js";

function Account({ session }) {
  if (!session.signed_in) {
    const next = encodeURIComponent(location.pathname);
    return html`<a href=${"/signin?next=" + next}>Sign in</a>`;
  }
  const out = async () => {
    await signOut();
    location.assign("/");
  };
  return html`<span class="who">${session.user.email} <span class="role">(${session.user.role})</span></span>
    <button type="button" class="link" onClick=${out}>Sign out</button>`;
}

// The session and the page's module load together.
const [session, page] = await Promise.all([loadSession(), import(`./${document.body.dataset.page}.js`)]);
render(html`<${Account} session=${session} />`, document.getElementById("account"));
const main = document.getElementById("main");
main.textContent = "";
page.mount(main, session);
