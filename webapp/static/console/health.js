// Health (admin): token and sync figures, and an SVG chart of the last 24 hours.
import { api, el, fmtDuration, fmtPercent, notice, say, sayError, sleep, start, svg } from "./api.js";

const EVERY_SECONDS = 30;
const updated = document.getElementById("updated");
const chart = document.getElementById("chart");
const SERIES = {
  refresh: { label: "Refresh", outcomes: ["success", "transient_error", "permanent_error", "config_error"] },
  sync: { label: "Sync", outcomes: ["succeeded", "failed", "running"] },
};
const WORDS = {
  success: "success", transient_error: "transient error", permanent_error: "permanent error",
  config_error: "configuration error", succeeded: "succeeded", failed: "failed", running: "running",
};

function figures(target, rows) {
  target.replaceChildren(...rows.flatMap(([key, label, value]) => [
    el("dt", {}, label), el("dd", { class: "num", dataset: { figure: key } }, value ?? "—"),
  ]));
}

function showTokens(t) {
  figures(document.getElementById("token-figures"), [
    ["tokens.total", "Tokens", t.total],
    ["tokens.active", "Active", t.active],
    ["tokens.expired", "Expired", t.expired],
    ["tokens.needs_reauth", "Needs re-auth", t.needs_reauth],
    ["tokens.revoked", "Revoked", t.revoked],
    ["tokens.expiring_soon", `Expiring within ${t.expiring_soon_window_hours} h`, t.expiring_soon],
    ["tokens.refresh_attempts_24h", "Refresh attempts, 24 h", t.refresh_attempts_24h],
    ["tokens.refresh_failures_24h", "Refresh failures, 24 h", t.refresh_failures_24h],
    ["tokens.refresh_success_rate_24h", "Refresh success rate, 24 h", fmtPercent(t.refresh_success_rate_24h)],
  ]);
}

function showSync(s) {
  figures(document.getElementById("sync-figures"), [
    ["sync.accounts.total", "Accounts", s.accounts.total],
    ["sync.accounts.active", "Active", s.accounts.active],
    ["sync.accounts.error", "In error", s.accounts.error],
    ["sync.accounts.paused", "Paused", s.accounts.paused],
    ["sync.runs.total", "Sync runs, 24 h", s.sync_runs_24h.total],
    ["sync.runs.succeeded", "Succeeded runs, 24 h", s.sync_runs_24h.succeeded],
    ["sync.runs.failed", "Failed runs, 24 h", s.sync_runs_24h.failed],
    ["sync.success_rate_24h", "Success rate, 24 h", fmtPercent(s.success_rate_24h)],
    ["sync.avg_duration_seconds", "Average duration", fmtDuration(s.avg_duration_seconds)],
    ["sync.p95_duration_seconds", "p95 duration", fmtDuration(s.p95_duration_seconds)],
    ["sync.messages_synced_24h", "Messages synced, 24 h", s.messages_synced_24h],
  ]);
}

const outcomeClass = (series, outcome) =>
  `seg ${series}-${SERIES[series].outcomes.includes(outcome) ? outcome : "other"}`;

// Two stacked bars per hour: refresh outcomes (left) and sync outcomes (right).
function showTimeline(buckets) {
  const width = 720;
  const height = 220;
  const pad = { left: 36, right: 8, top: 10, bottom: 24 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const sum = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
  const peak = Math.max(1, ...buckets.flatMap((b) => [sum(b.refresh), sum(b.sync)]));
  const slot = plotW / Math.max(1, buckets.length);
  const barW = Math.max(2, (slot - 6) / 2); // two bars, 1 px apart, 5 px between hours
  const y = (value) => pad.top + plotH - (value / peak) * plotH;
  const hour = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "chart-title", class: "timeline" },
    svg("title", { id: "chart-title" }, "Refresh and sync outcomes per hour, last 24 hours"));
  for (const value of new Set([0, Math.ceil(peak / 2), peak])) {
    const at = y(value);
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: at, y2: at, class: "gridline" }),
      svg("text", { x: pad.left - 6, y: at + 4, class: "axis", "text-anchor": "end" }, value));
  }
  buckets.forEach((bucket, i) => {
    const label = hour.format(new Date(bucket.start));
    ["refresh", "sync"].forEach((series, j) => {
      let top = pad.top + plotH;
      const x = pad.left + i * slot + 2.5 + j * (barW + 1);
      const counts = bucket[series] || {};
      const order = [...SERIES[series].outcomes, ...Object.keys(counts).filter((o) => !SERIES[series].outcomes.includes(o))];
      for (const outcome of order) {
        const n = counts[outcome] || 0;
        if (!n) continue;
        const h = (n / peak) * plotH;
        top -= h;
        root.append(svg("rect", { x, y: top, width: barW, height: h, class: outcomeClass(series, outcome) },
          svg("title", {}, `${label}: ${SERIES[series].label.toLowerCase()} ${WORDS[outcome] || outcome} ${n}`)));
      }
    });
    if (i % 3 === 0) {
      root.append(svg("text", { x: pad.left + i * slot + slot / 2, y: height - 6, class: "axis", "text-anchor": "middle" }, label));
    }
  });
  if (!buckets.some((b) => sum(b.refresh) || sum(b.sync))) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "axis empty", "text-anchor": "middle" },
      "No refresh or sync activity in these hours."));
  }
  chart.replaceChildren(root);
}

function legend() {
  const items = Object.entries(SERIES).flatMap(([series, { label, outcomes }]) => outcomes.map((outcome) =>
    el("li", {}, svg("svg", { viewBox: "0 0 10 10", class: "swatch" }, svg("rect", { width: 10, height: 10, class: outcomeClass(series, outcome) })),
      ` ${label}: ${WORDS[outcome]}`)));
  document.getElementById("legend").replaceChildren(...items);
}

async function load() {
  const [tokens, sync, timeline] = await Promise.all([
    api("/health/oauth-tokens"), api("/health/email-sync"), api("/health/timeline", { query: { hours: 24 } }),
  ]);
  showTokens(tokens);
  showSync(sync);
  showTimeline(timeline.buckets);
  const at = new Date().toLocaleTimeString();
  updated.textContent = `Updated ${at}; refreshes every ${EVERY_SECONDS} s.`;
  notice.hidden = true;
}

const me = await start();
if (!me.roles.includes("admin")) {
  updated.textContent = "";
  say(notice, "error", "The Health page needs the admin role: sign in with an admin token to see it.");
} else {
  legend();
  for (;;) {
    try {
      await load();
    } catch (error) {
      updated.textContent = `Last attempt ${new Date().toLocaleTimeString()} failed; retrying every ${EVERY_SECONDS} s.`;
      sayError(notice, error);
    }
    await sleep(EVERY_SECONDS * 1000);
  }
}
