// Mailboxes: every token and account with its status, actions and last sync runs.
import {
  CONSOLE, api, beginConnect, el, fmtDuration, fmtRelative, fmtTime, notice, runAction, say,
  sayError, sleep, start,
} from "./api.js";

const root = document.getElementById("mailboxes");
const lines = new Map(); // card key -> [kind, text], kept across re-renders
const TOKEN_LABELS = { active: "active", expired: "expired", needs_reauth: "needs re-auth", revoked: "revoked" };
const SYNC_POLL_SECONDS = 60;

const badge = (kind, text) => el("span", { class: `badge ${kind}` }, text);

async function loadAll() {
  const [tokens, accounts] = await Promise.all([
    api("/oauth/tokens", { query: { limit: 500 } }),
    api("/accounts", { query: { limit: 500 } }),
  ]);
  const accountsById = new Map(accounts.items.map((account) => [account.id, account]));
  const boxes = tokens.items.map((token) => ({
    key: `token-${token.id}`, token, account: accountsById.get(token.account_id) || null,
  }));
  const linked = new Set(tokens.items.map((token) => token.account_id));
  for (const account of accounts.items) {
    if (!linked.has(account.id)) boxes.push({ key: `account-${account.id}`, token: null, account });
  }
  await Promise.all(boxes.map(async (box) => {
    if (!box.account) return;
    try {
      box.runs = (await api(`/accounts/${box.account.id}/sync-runs`, { query: { limit: 5 } })).items;
    } catch (error) {
      box.runsError = error;
    }
  }));
  return boxes;
}

async function reload() {
  root.setAttribute("aria-busy", "true");
  try {
    const boxes = await loadAll();
    root.replaceChildren(...(boxes.length ? boxes.map(card) : [emptyState()]));
  } catch (error) {
    root.replaceChildren();
    sayError(notice, error);
  } finally {
    root.setAttribute("aria-busy", "false");
  }
}

function emptyState() {
  return el("p", { class: "muted empty" }, "No mailbox is connected yet. Use a Connect button above.");
}

function card(box) {
  const { token, account } = box;
  const address = (token || account).email_address;
  const provider = (token || account).provider;
  const status = el("p", { class: "card-status", hidden: true });
  const remembered = lines.get(box.key);
  if (remembered) say(status, ...remembered);

  const badges = [];
  if (token) badges.push(badge(`token-${token.status}`, `token ${TOKEN_LABELS[token.status] || token.status}`));
  if (account) {
    badges.push(badge(`sync-${account.status}`, `sync ${account.status}`));
    if (!account.sync_enabled) badges.push(badge("sync-off", "sync disabled"));
  }

  const facts = [];
  const fact = (term, ...value) => facts.push(el("dt", {}, term), el("dd", {}, ...value));
  if (token) {
    fact("Expires", fmtTime(token.expires_at), token.expires_at ? el("span", { class: "muted" }, ` (${fmtRelative(token.expires_at)})`) : "");
    fact("Last refresh", fmtTime(token.last_refreshed_at));
    if (token.status_reason) fact("Reason", token.status_reason);
    if (token.last_refresh_error) fact("Last refresh error", el("span", { class: "error-text" }, token.last_refresh_error));
  }
  if (account) {
    fact("Last synced", fmtTime(account.last_synced_at));
    if (account.last_error) fact("Last sync error", el("span", { class: "error-text" }, account.last_error));
  }

  const actions = el("div", { class: "actions" });
  const act = (label, progress, work, cls = "") => {
    const button = el("button", { type: "button", class: `btn ${cls}`.trim() }, label);
    button.addEventListener("click", () => perform(box, button, status, progress, work));
    actions.append(button);
    return button;
  };
  if (token && token.status !== "revoked") {
    act("Refresh", "Refreshing the token at the provider…", () => refreshToken(token));
  }
  if (token) {
    act("Reconnect", `Opening ${provider}…`, () => beginConnect(token.provider, token.email_address).then(() => null),
      token.status === "needs_reauth" || token.status === "revoked" ? "primary" : "");
  }
  if (token && token.status !== "revoked") {
    act("Revoke", "Revoking…", () => revokeToken(token), "danger");
  }
  if (account) {
    act("Sync now", "Queueing a sync…", (progress) => syncNow(account, progress));
    act(account.sync_enabled ? "Disable sync" : "Enable sync", "Saving…", () => toggleSync(account));
    actions.append(el("a", { class: "btn link", href: `${CONSOLE}messages?account=${account.id}` }, "Messages"));
  }

  return el("section", { class: "card mailbox", dataset: { key: box.key, email: address } },
    el("header", { class: "card-head" },
      el("h2", {}, address),
      el("span", { class: "muted" }, provider),
      el("span", { class: "badges" }, badges)),
    el("dl", { class: "facts" }, facts),
    actions,
    status,
    account ? runsTable(box) : null);
}

function runsTable(box) {
  if (box.runsError) return el("p", { class: "muted" }, `Sync runs unavailable: ${box.runsError.message}`);
  if (!box.runs || !box.runs.length) return el("p", { class: "muted" }, "No sync run yet.");
  return el("table", { class: "table runs" },
    el("caption", {}, "Last sync runs"),
    el("thead", {}, el("tr", {}, ["Started", "Outcome", "New", "Updated", "Deleted", "Duration", "Error"]
      .map((name, i) => el("th", { class: i >= 2 && i <= 5 ? "num" : null }, name)))),
    el("tbody", {}, box.runs.map((run) => el("tr", {},
      el("td", {}, fmtTime(run.started_at)),
      el("td", {}, badge(`run-${run.outcome}`, run.outcome)),
      el("td", { class: "num" }, run.new_count),
      el("td", { class: "num" }, run.updated_count),
      el("td", { class: "num" }, run.deleted_count),
      el("td", { class: "num" }, fmtDuration(run.duration_seconds)),
      el("td", { class: "error-text" }, run.error || "")))));
}

// The progress line stays until the list is reloaded; the outcome then shows on the
// fresh card. A failure shows its message at once; null means "navigating away".
async function perform(box, button, status, progress, work) {
  let outcome = null;
  await runAction(button, status, progress, async (update) => {
    outcome = await work(update);
    return null;
  });
  if (outcome === null) return;
  lines.set(box.key, Array.isArray(outcome) ? outcome : ["success", outcome]);
  await reload();
}

async function refreshToken(token) {
  const fresh = await api(`/oauth/tokens/${token.id}/refresh`, { method: "POST" });
  return `Token refreshed: it now expires ${fmtTime(fresh.expires_at)}.`;
}

async function revokeToken(token) {
  const question = `Revoke Mailkey's access to ${token.email_address}? Its stored tokens are wiped, `
    + "sync stops, and the mailbox must be reconnected to be used again.";
  if (!window.confirm(question)) return ["info", "Revoke cancelled: nothing changed."];
  const answer = await api(`/oauth/tokens/${token.id}/revoke`, { method: "POST" });
  const where = answer.provider_revoked ? "Revoked at the provider and wiped here." : "Wiped here.";
  return `${where} ${answer.message || ""}`.trim();
}

async function syncNow(account, progress) {
  const { sync_run_id: runId } = await api(`/accounts/${account.id}/sync`, { method: "POST" });
  const deadline = Date.now() + SYNC_POLL_SECONDS * 1000;
  while (Date.now() < deadline) {
    const runs = (await api(`/accounts/${account.id}/sync-runs`, { query: { limit: 5 } })).items;
    const run = runs.find((item) => item.id === runId);
    if (run && run.outcome === "succeeded") {
      return `Sync finished: ${run.new_count} new, ${run.updated_count} updated, `
        + `${run.deleted_count} deleted in ${fmtDuration(run.duration_seconds)}.`;
    }
    if (run && run.outcome === "failed") return ["error", `Sync failed: ${run.error || "no reason given"}`];
    progress(`Syncing (run ${runId})…`);
    await sleep(1500);
  }
  return ["info", `Sync run ${runId} is still queued or running; its result will appear under “Last sync runs”.`];
}

async function toggleSync(account) {
  const updated = await api(`/accounts/${account.id}`, { method: "PATCH", json: { sync_enabled: !account.sync_enabled } });
  return updated.sync_enabled ? "Sync enabled." : "Sync disabled: no scheduled sync until you enable it again.";
}

for (const button of document.querySelectorAll("#connect [data-provider]")) {
  button.addEventListener("click", () => runAction(button, notice, `Opening ${button.textContent.replace(/^Connect /, "")}…`,
    () => beginConnect(button.dataset.provider).then(() => null)));
}

await start();
await reload();
