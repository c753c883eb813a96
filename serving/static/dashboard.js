// Live dashboard: polls the JSON API every POLL_MS and redraws with Plotly.react.
// Endpoints that do not exist yet (404) leave their chart with a "waiting" note.
"use strict";

const POLL_MS = 2000;
const RATE_POINTS = 150; // five minutes at one point per poll
const INK = "#e6ebf5", MUTED = "#8c97ad", GRID = "#242d42", ACCENT = "#5aa9ff";
const state = { updates: 0, lastApplied: null, lastAt: null, rateX: [], rateY: [] };
window.dashboardState = state;

const layoutBase = () => ({
  margin: { l: 48, r: 12, t: 8, b: 32 },
  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
  font: { color: INK, size: 11 },
  xaxis: { gridcolor: GRID, zerolinecolor: GRID, color: MUTED },
  yaxis: { gridcolor: GRID, zerolinecolor: GRID, color: MUTED, rangemode: "tozero" },
  showlegend: false,
});
const config = { displayModeBar: false, responsive: true };
// Text from the API goes into innerHTML only escaped: dead-letter reasons are NATS subject
// tokens a producer login may choose, and the page holds an API key in sessionStorage.
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (value) => String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);

function draw(id, traces, layout) {
  const el = document.getElementById(id);
  Plotly.react(el, traces, Object.assign(layoutBase(), layout || {}), config);
}

function waiting(id, text) {
  const el = document.getElementById(id);
  if (!el.dataset.waiting) { Plotly.purge(el); el.innerHTML = `<div class="empty">${text}</div>`; el.dataset.waiting = "1"; }
}

function ready(id) {
  const el = document.getElementById(id);
  if (el.dataset.waiting) { el.innerHTML = ""; delete el.dataset.waiting; }
}

// The API key (read scope) lives in this tab's sessionStorage: given once as
// /dashboard#key=<key> (then removed from the address bar and history) or typed
// into the form that shows when the API answers 401/403. A public dashboard needs none.
const KEY_ITEM = "audience-api-key";
function takeKeyFromUrl() {
  const match = window.location.hash.match(/[#&]key=([^&]+)/);
  if (!match) return;
  sessionStorage.setItem(KEY_ITEM, decodeURIComponent(match[1]));
  history.replaceState(null, "", window.location.pathname + window.location.search);
}
takeKeyFromUrl();

function askForKey(status) {
  state.auth = status;
  document.body.dataset.auth = String(status);
  const form = document.getElementById("key-form");
  document.getElementById("key-note").textContent = status === 401 ? "a key is needed" : "this key lacks the read scope";
  form.hidden = false;
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("key-input");
  if (input.value.trim()) sessionStorage.setItem(KEY_ITEM, input.value.trim());
  input.value = "";
  document.getElementById("key-form").hidden = true;
  poll();
});

async function getJson(path) {
  const headers = { accept: "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.authorization = `Bearer ${key}`;
  try {
    const answer = await fetch(path, { headers });
    if (answer.status === 401 || answer.status === 403) askForKey(answer.status);
    return answer.ok ? await answer.json() : null;
  } catch (error) {
    return null;
  }
}

const fmt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 }));
const setText = (id, value) => { document.getElementById(id).textContent = value; };

function showStatus(status) {
  const shards = status.shards || [];
  const applied = shards.reduce((s, x) => s + x.applied_events, 0);
  const now = Date.now() / 1000;
  if (state.lastApplied !== null && now > state.lastAt) {
    state.rateX.push(new Date());
    state.rateY.push(Math.max(0, (applied - state.lastApplied) / (now - state.lastAt)));
    if (state.rateX.length > RATE_POINTS) { state.rateX.shift(); state.rateY.shift(); }
  }
  state.lastApplied = applied; state.lastAt = now; state.applied = applied;
  setText("kpi-applied", fmt(applied));
  setText("kpi-users", fmt(shards.reduce((s, x) => s + x.users, 0)));
  setText("kpi-lag", fmt(Object.values(status.lag || {}).reduce((s, x) => s + x, 0)));
  setText("kpi-dead", fmt(Object.values(status.dead_letters || {}).reduce((s, x) => s + x, 0)));
  setText("kpi-rate", state.rateY.length ? fmt(state.rateY[state.rateY.length - 1]) : "–");
  draw("chart-rate", [{ x: state.rateX, y: state.rateY, type: "scatter", mode: "lines", line: { color: ACCENT, width: 2 }, fill: "tozeroy", fillcolor: "rgba(90,169,255,0.15)" }]);
  const lag = status.lag || {};
  const partitions = Object.keys(lag).sort((a, b) => Number(a) - Number(b));
  draw("chart-lag", [{ type: "bar", x: partitions.map((p) => `p${p}`), y: partitions.map((p) => lag[p]), marker: { color: "#ffb454" } }], { xaxis: { type: "category", color: MUTED, tickfont: { size: 9 } } });
  showOps(status, shards);
  const names = shards.map((s) => `shard ${s.shard}`);
  draw("chart-shards", [
    { x: names, y: shards.map((s) => s.applied_events), type: "bar", name: "applied", marker: { color: ACCENT } },
    { x: names, y: shards.map((s) => (s.freshness_ms || {}).p99), type: "scatter", mode: "markers+lines", name: "freshness p99 ms", yaxis: "y2", marker: { color: "#ffb454", size: 9 } },
  ], { yaxis2: { overlaying: "y", side: "right", color: "#ffb454", rangemode: "tozero", showgrid: false }, showlegend: true, legend: { orientation: "h", y: -0.2 } });
}

function showOps(status, shards) {
  const ms = (x) => (x == null ? "–" : `${fmt(x)} ms`);
  const rows = shards.map((s) => `<tr><td>shard ${esc(s.shard)} apply</td><td>${ms((s.apply_ms || {}).p50)}</td><td>${ms((s.apply_ms || {}).p99)}</td></tr>`
    + `<tr><td>shard ${esc(s.shard)} freshness</td><td>${ms((s.freshness_ms || {}).p50)}</td><td>${ms((s.freshness_ms || {}).p99)}</td></tr>`);
  const api = status.api_latency_ms || {};
  rows.push(`<tr><td>API requests</td><td>${ms(api.p50)}</td><td>${ms(api.p99)}</td></tr>`);
  const dead = Object.entries(status.dead_letters || {}).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(", ") || "none";
  const note = (text) => `<p style="color:var(--muted);margin:8px 6px">${text}</p>`;
  const recovering = (status.recovering || []).map((s) => `shard ${esc(s)}`).join(", ");
  const decisions = (status.autoscaling || {}).decisions || [];
  const last = decisions[decisions.length - 1];
  const verb = (status.autoscaling || {}).applied ? "applied" : "recommended";
  const rescaled = decisions.filter((d) => d.rescale && !d.rescale.error).slice(-1)[0];
  const moved = rescaled ? `; last rescale ${esc(rescaled.rescale.from)} → ${esc(rescaled.rescale.to)} live in ${esc(rescaled.rescale.took_s)} s` : "";
  const scaling = last ? `autoscaling: ${esc(last.current)} shards → ${esc(last.desired)} ${verb} (${esc(last.reason)})${moved}` : "autoscaling: no recommendation yet";
  document.getElementById("ops").innerHTML = "<table><tr><th></th><th>p50</th><th>p99</th></tr>" + rows.join("") + "</table>"
    + note(`dead letters: ${dead}`) + (recovering ? note(`recovering: ${recovering}`) : "") + `<p id="ops-scaling" style="color:var(--muted);margin:8px 6px">${scaling}</p>`;
}

function showEngagement(answer) {
  const buckets = (answer.buckets || []).slice(-60);
  if (!buckets.length) { waiting("chart-active", "waiting for events"); waiting("chart-funnel", "waiting for events"); return; }
  ready("chart-active"); ready("chart-funnel");
  setText("kpi-active", fmt(buckets[buckets.length - 1].active_users));
  draw("chart-active", [{ x: buckets.map((b) => b.start), y: buckets.map((b) => b.active_users), type: "bar", marker: { color: "#3ecf8e" } }]);
  const byType = {};
  for (const b of buckets) for (const [k, v] of Object.entries(b.events_by_type || {})) byType[k] = (byType[k] || 0) + v;
  showFunnel(state.conversion, byType);
  if (!state.trendsFromApi) showTrending((answer.totals || {}).top_items || [], "events");
}

// Funnel: step transitions within the conversion window from /v1/insights/conversion;
// without that endpoint, the raw event counts of the default steps (engagement).
const FUNNEL_COLORS = [ACCENT, "#7c8cff", "#3ecf8e", "#ffb454", "#ff8f6b"];
function showFunnel(conversion, byType) {
  const totals = conversion && conversion.totals;
  const steps = totals ? totals.steps.map((s) => s.type) : ["page_view", "add_to_cart", "purchase"];
  const counts = totals ? totals.steps.map((s) => s.count) : steps.map((s) => byType[s] || 0);
  const colors = steps.map((_, i) => FUNNEL_COLORS[i % FUNNEL_COLORS.length]);
  draw("chart-funnel", [{ type: "funnel", y: steps, x: counts, textinfo: "value+percent initial", marker: { color: colors } }], { margin: { l: 90, r: 12, t: 8, b: 20 } });
}

function showTrending(items, field) {
  if (!items.length) { waiting("chart-trending", "waiting for events"); return; }
  ready("chart-trending");
  const top = items.slice(0, 10).reverse();
  draw("chart-trending", [{ type: "bar", orientation: "h", y: top.map((i) => i.id), x: top.map((i) => i[field]), marker: { color: "#ff8f6b" } }], { margin: { l: 90, r: 12, t: 8, b: 28 } });
}

function showRetention(answer) {
  const cohorts = (answer && answer.cohorts) || [];
  if (!cohorts.length) { waiting("chart-retention", "retention appears once cohorts exist"); return; }
  ready("chart-retention");
  draw("chart-retention", cohorts.slice(-5).map((c) => ({ type: "scatter", mode: "lines+markers", name: c.date, x: c.curve.map((_, i) => i), y: c.curve })), { showlegend: true, legend: { orientation: "h", y: -0.2 }, xaxis: { title: "days since first seen", color: MUTED, gridcolor: GRID } });
}

function showAlerts(answer) {
  const alerts = (answer && answer.alerts) || [];
  const box = document.getElementById("alerts");
  if (!alerts.length) { box.innerHTML = '<div class="empty">no alerts</div>'; return; }
  box.innerHTML = "<table><tr><th>when</th><th>kind</th><th>what</th></tr>" +
    alerts.slice(0, 8).map((a) => `<tr><td>${esc(a.at || "")}</td><td>${esc(a.kind || "")}</td><td>${esc(a.message || "")}</td></tr>`).join("") + "</table>";
}

async function poll() {
  const [status, engagement, conversion, trends, retention, alerts] = await Promise.all([
    getJson("/v1/status"),
    getJson("/v1/insights/engagement?granularity=minute"),
    getJson("/v1/insights/conversion?granularity=minute"),
    getJson("/v1/insights/trends"),
    getJson("/v1/insights/retention"),
    getJson("/v1/insights/alerts"),
  ]);
  document.getElementById("live").classList.toggle("live", status !== null);
  if (status) showStatus(status);
  state.conversion = conversion && conversion.totals && conversion.totals.steps ? conversion : null;
  state.trendsFromApi = Boolean(trends && trends.trending_items);
  if (state.trendsFromApi) showTrending(trends.trending_items, "score");
  if (engagement) showEngagement(engagement); else waiting("chart-active", "waiting for the insights API");
  showRetention(retention);
  showAlerts(alerts);
  state.updates += 1;
  document.body.dataset.updates = String(state.updates);
  setText("as-of", `updated ${new Date().toLocaleTimeString()}` + (engagement ? ` · insights as of ${engagement.as_of}` : ""));
}

poll();
setInterval(poll, POLL_MS);
