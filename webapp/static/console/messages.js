// Messages: synced envelopes of one mailbox (optionally one folder), 50 a page.
import { api, el, fmtBytes, fmtTime, notice, say, sayError, start } from "./api.js";

const PAGE_SIZE = 50;
const accountSelect = document.getElementById("account");
const folderSelect = document.getElementById("folder");
const tbody = document.querySelector("#messages tbody");
const empty = document.getElementById("empty");
const prev = document.getElementById("prev");
const next = document.getElementById("next");
const pageInfo = document.getElementById("page-info");
const wanted = new URLSearchParams(location.search);
let cursors = [null]; // cursor of each page seen so far; the last is the current page
let nextCursor = null;

function remember() {
  const query = new URLSearchParams({ account: accountSelect.value });
  if (folderSelect.value) query.set("folder", folderSelect.value);
  history.replaceState(null, "", `${location.pathname}?${query}`);
}

async function loadFolders() {
  const folders = (await api(`/accounts/${accountSelect.value}/folders?limit=500`)).items;
  folderSelect.replaceChildren(el("option", { value: "" }, "All folders"),
    ...folders.map((folder) => el("option", { value: folder.name }, `${folder.name} (${folder.message_count})`)));
  const folder = wanted.get("folder");
  if (folder && folders.some((item) => item.name === folder)) folderSelect.value = folder;
  wanted.delete("folder");
}

async function loadPage() {
  prev.disabled = next.disabled = true;
  pageInfo.textContent = "Loading…";
  try {
    const page = await api(`/accounts/${accountSelect.value}/messages`, {
      query: { folder: folderSelect.value, limit: PAGE_SIZE, cursor: cursors.at(-1) },
    });
    tbody.replaceChildren(...page.items.map(row));
    empty.hidden = page.items.length > 0;
    nextCursor = page.next_cursor;
    pageInfo.textContent = `Page ${cursors.length}`;
    notice.hidden = true;
  } catch (error) {
    pageInfo.textContent = "";
    sayError(notice, error);
  } finally {
    prev.disabled = cursors.length < 2;
    next.disabled = !nextCursor;
  }
}

function row(message) {
  const subject = message.subject
    ? el("div", { class: "subject" }, message.subject)
    : el("div", { class: "subject muted" }, "(no subject)");
  return el("tr", { dataset: { id: message.id } },
    el("td", { class: "nowrap" }, fmtTime(message.sent_at)),
    el("td", {}, message.from_address || "—"),
    el("td", {}, subject, message.snippet ? el("div", { class: "snippet muted" }, message.snippet) : null),
    el("td", {}, message.folder),
    el("td", {}, (message.flags || []).join(" ")),
    el("td", { class: "num" }, fmtBytes(message.size)));
}

async function restart() {
  cursors = [null];
  remember();
  await loadPage();
}

accountSelect.addEventListener("change", async () => {
  try {
    await loadFolders();
  } catch (error) {
    sayError(notice, error);
  }
  await restart();
});
folderSelect.addEventListener("change", restart);
next.addEventListener("click", () => {
  cursors.push(nextCursor);
  loadPage();
});
prev.addEventListener("click", () => {
  cursors.pop();
  loadPage();
});

await start();
try {
  const accounts = (await api("/accounts", { query: { limit: 500 } })).items;
  if (!accounts.length) {
    say(notice, "info", "No mailbox is connected yet: connect one on the Mailboxes page.");
    pageInfo.textContent = "";
  } else {
    accountSelect.replaceChildren(...accounts.map((account) =>
      el("option", { value: account.id }, `${account.email_address} (${account.provider})`)));
    if (accounts.some((account) => String(account.id) === wanted.get("account"))) {
      accountSelect.value = wanted.get("account");
    }
    await loadFolders();
    await restart();
  }
} catch (error) {
  sayError(notice, error);
}
