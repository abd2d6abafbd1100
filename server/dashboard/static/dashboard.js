// fedshield dashboard: renders /api/summary and each summary the server pushes on
// /api/events (server-sent events). Text is set with textContent only: site names and
// reasons come from the sites and are never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const charts = {};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function num(x, digits) { return el("td", fmt(x, digits), "num"); }

function listed(map, withValue) {
  const keys = Object.keys(map || {}).sort();
  if (!keys.length) return "–";
  return keys.map((k) => (withValue ? `${k} (${map[k]})` : k)).join(", ");
}

function chart(id, series, data, yRange, bands) {
  const box = $(id);
  const width = Math.max(320, box.clientWidth - 8);
  if (charts[id] && charts[id].series.length === series.length + 1) {
    charts[id].setData(data);
    return;
  }
  if (charts[id]) charts[id].destroy();
  const opts = {
    width, height: 240,
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    // rounds are whole numbers: ticks at 1, 2, 5, 10, ... rounds apart, never at 0.5
    axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
    series: [{ label: "round" }, ...series],
    bands: bands || [],
  };
  charts[id] = new uPlot(opts, data, box);
}

function render(s) {
  document.title = `fedshield ${s.name}`;
  $("run-name").textContent = s.name;
  const delta = s.delta < 1e-3 ? Number(s.delta).toExponential() : String(s.delta);
  const dp = s.privacy_mode === "none" ? "no DP" : `${s.privacy_mode}, ${s.accountant} accountant, δ=${delta}`;
  $("run-meta").textContent = `task ${s.task} · ${s.strategy} · ${dp}` +
    (s.unit === "site" ? " · site-level DP" : "") + (s.secure_aggregation ? " · SecAgg+" : "") +
    (s.finished ? " · finished" : " · running");

  const rounds = s.rounds;
  const done = rounds.filter((r) => r.round > 0);
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  $("rounds-done").textContent = `${done.length} / ${s.rounds_planned}`;
  $("rounds-sub").textContent = last ? `last: round ${last.round}, ${fmt(last.elapsed_s, 0)} s into the run` : "no round evaluated yet";
  $("last-metrics").textContent = last ? `${fmt(last.accuracy, 3)} / ${fmt(last.macro_f1, 3)}` : "–";
  $("last-round").textContent = last ? `round ${last.round}` : "";

  const eps = s.sites.map((x) => x.epsilon);
  const dpOn = s.privacy_mode !== "none";
  $("epsilon").textContent = dpOn && eps.length ?
    `${fmt(Math.max(...eps), 2)} / ${fmt(eps.reduce((a, b) => a + b, 0) / eps.length, 2)}` : "–";
  const over = s.sites.filter((x) => x.budget !== null && x.epsilon > x.budget).map((x) => x.site);
  $("budget").textContent = !dpOn ? "no DP: nothing accounted" :
    `budget ${s.budget} per site` + (over.length ? ` · OVER: ${over.join(", ")}` : "") +
    (s.unit === "site" && last && last.site_level_epsilon !== null ?
      ` · site-level ε ${fmt(last.site_level_epsilon, 3)}` : "");

  const trained = s.sites.reduce((a, x) => a + x.trained, 0);
  const declined = s.sites.reduce((a, x) => a + x.declined, 0);
  const dropped = s.sites.reduce((a, x) => a + x.dropped, 0);
  $("sites-connected").textContent = `${s.connected} / ${s.sites_expected}`;
  $("sites-sub").textContent = `connected · over the run ${trained} trained, ${declined} declined, ${dropped} dropped`;

  $("audit-state").textContent = s.audit.state;
  $("audit-state").className = `value ${s.audit.state}`;
  $("audit-detail").textContent = s.audit.detail;

  const xs = rounds.map((r) => r.round);
  chart("chart-metrics", [
    { label: "accuracy", stroke: "#3a78c2", width: 2 },
    { label: "macro-F1", stroke: "#d9822b", width: 2, dash: [6, 4] },
  ], [xs, rounds.map((r) => r.accuracy), rounds.map((r) => r.macro_f1)], [0, 1]);
  // one band from the lowest to the highest site, not a line per site: sites that spend
  // alike would draw identical lines on top of each other
  chart("chart-epsilon", [
    { label: "ε lowest site", stroke: "#6a9fd8", width: 2 },
    { label: "ε highest site", stroke: "#1d4f91", width: 2 },
    { label: "budget", stroke: "#b42318", width: 1, dash: [4, 4], points: { show: false } },
  ], [xs, rounds.map((r) => r.site_epsilon_min), rounds.map((r) => r.site_epsilon_max),
    rounds.map(() => s.budget)], null, [{ series: [2, 1], fill: "rgba(58, 120, 194, 0.15)" }]);

  const sites = $("sites").tBodies[0];
  sites.replaceChildren(...s.sites.map((x) => {
    const bar = el("div", null, "bar" + (x.budget !== null && x.epsilon > x.budget ? " over" : ""));
    const fill = el("div");
    fill.style.width = x.budget ? `${Math.min(100, (100 * x.epsilon) / x.budget)}%` : "0";
    bar.appendChild(fill);
    const barCell = el("td");
    barCell.appendChild(bar);
    const tr = row([x.site, num(x.epsilon, 4), x.budget === null ? "–" : String(x.budget), barCell,
      num(x.sampled, 0), num(x.trained, 0), num(x.declined, 0), num(x.dropped, 0), x.last_problem || "–"]);
    tr.dataset.site = x.site;
    return tr;
  }));

  const body = $("rounds").tBodies[0];
  body.replaceChildren(...rounds.slice().reverse().map((r) => {
    const tr = row([String(r.round), num(r.accuracy, 4), num(r.macro_f1, 4), num(r.epsilon_max, 3),
      num(r.sampled, 0), num(r.trained, 0), listed(r.declined, true), listed(r.dropped, true),
      listed(r.secagg_dropped, true), r.defence || (r.round ? "–" : "initial model"), `${fmt(r.elapsed_s, 0)} s`]);
    tr.dataset.round = String(r.round);
    if (r.empty) tr.className = "empty-round";
    return tr;
  }));

  $("problems").textContent = s.problems.join(" · ");
}

function show(payload) {
  if (payload.error) {
    $("error").hidden = false;
    $("error").textContent = payload.error;
    return;
  }
  $("error").hidden = true;
  render(payload.summary);
}

fetch("/api/summary").then((r) => r.json()).then(show).catch(() => {});
const events = new EventSource("/api/events");
events.addEventListener("summary", (e) => show(JSON.parse(e.data)));
events.onopen = () => { $("live").textContent = "live"; $("live").className = "live"; };
events.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live off"; };
window.addEventListener("resize", () => {
  for (const id of Object.keys(charts)) charts[id].setSize({ width: Math.max(320, $(id).clientWidth - 8), height: 240 });
});
