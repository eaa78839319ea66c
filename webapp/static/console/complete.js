// OAUTH_REDIRECT_URI page: forward code and state (or error) to the callback with the
// JWT, wipe them from the address bar, and say what happened.
import { PROVIDER_KEY, api, beginConnect, describe, el, runAction, say, session } from "./api.js";

const box = document.getElementById("complete");
const params = new URLSearchParams(location.search);
const forward = {};
for (const name of ["code", "state", "error", "error_description"]) {
  if (params.has(name)) forward[name] = params.get(name);
}
history.replaceState(null, "", location.pathname); // code and state leave the address bar and history
const provider = box.dataset.provider || sessionStorage.getItem(PROVIDER_KEY) || "";
sessionStorage.removeItem(PROVIDER_KEY);

// What each error code means for the person who just clicked "Connect".
const WORDS = {
  consent_denied: "Consent was declined at the provider, so no mailbox was connected.",
  invalid_state: "This connection attempt is no longer valid: it expired (after 10 minutes), was already used, or was started by another user. Start again.",
  insufficient_scope: "The provider did not grant access to mail (missing mail scope). Connect again and allow Mailkey to read and send mail.",
  provider_error: "The provider reported an error while finishing the connection.",
  provider_config_error: "The provider rejected Mailkey's own client credentials: the operator must fix the provider configuration.",
  provider_unavailable: "The provider is down or not responding. Try again in a few minutes.",
  provider_not_configured: "This provider is not configured on this Mailkey server.",
  unauthorized: "Your console session has ended, so the connection could not be finished. Sign in and connect again.",
  not_found: "Mailkey does not know this provider.",
  nothing: "Nothing to finish here.",
  unknown_provider: "The provider of this connection is unknown.",
  network: "Mailkey could not be reached, so the connection could not be finished.",
};
const LABELS = { google: "Google", microsoft: "Microsoft", yahoo: "Yahoo" };
const label = LABELS[provider] || provider;

function fail(code, detail) {
  const title = WORDS[code] || "The mailbox could not be connected.";
  const status = el("p", { class: "card-status" });
  say(status, "error", title);
  const parts = [status];
  if (detail && detail !== title) parts.push(el("p", { class: "muted" }, `Mailkey said: ${detail}`));
  if (provider && session.token()) {
    const again = el("button", { type: "button", class: "btn primary" }, `Try again with ${label}`);
    again.addEventListener("click", () => runAction(again, status, `Opening ${label}…`, () => beginConnect(provider).then(() => null)));
    parts.push(el("p", {}, again));
  }
  box.replaceChildren(...parts);
}

async function complete() {
  if (!forward.state && !forward.error) {
    fail("nothing", "This page is where a provider sends you back after you connect a mailbox; start from Mailboxes.");
    return;
  }
  if (forward.error && !forward.state) {
    const said = `The provider answered: ${forward.error_description || forward.error}`;
    fail(forward.error === "access_denied" ? "consent_denied" : "provider_error", said);
    return;
  }
  if (!provider) {
    fail("unknown_provider", "The provider of this connection is unknown in this tab (it is remembered only in the tab that started it). Start again from Mailboxes.");
    return;
  }
  if (!session.token()) {
    fail("unauthorized", "This tab is not signed in to the console.");
    return;
  }
  try {
    const { status, data: token } = await api(`/oauth/callback/${encodeURIComponent(provider)}`, { query: forward, withStatus: true });
    const line = el("p", { class: "card-status" });
    say(line, "success", status === 201
      ? `Connected ${token.email_address} (${label}).`
      : `Reconnected ${token.email_address} (${label}); its tokens were renewed.`);
    box.replaceChildren(line, el("p", { class: "muted" }, "The first sync has been queued; its result appears on the Mailboxes page."));
  } catch (error) {
    fail(error.code, describe(error));
  }
}

await complete();
