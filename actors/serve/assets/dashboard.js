// The tickmesh dashboard: per served model, the stored closes and the
// forecast; the model table (what serves, every version with the promotion
// gate's verdict); the cluster's nodes and jobs; live updates from
// /events (server-sent events). Served by every serve node at /; uses only
// this node's HTTP API and the vendored uPlot.
"use strict";

const HISTORY = 120;
const STEPS = 20;
const POLL_MS = 10000;
const charts = new Map();

const $ = (sel) => document.querySelector(sel);
const text = (v) => (v === null || v === undefined ? "" : String(v));
const num = (v, d = 3) => (typeof v === "number" && isFinite(v) ? v.toFixed(d) : "");

async function getJson(url) {
  const r = await fetch(url);
  if (!r.ok) {
    throw new Error(`${url}: ${r.status}`);
  }
  return r.json();
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = text(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function versionsCell(row, versions) {
  const td = cell(row, "");
  for (const v of versions) {
    const span = document.createElement("span");
    span.className = `v ${v.status}`;
    span.textContent = `v${v.version} ${v.status}`;
    const gate = v.metrics && v.metrics.gate;
    span.title = gate ? gate.reason : `${v.kind}, ${v.created_at}`;
    td.appendChild(span);
  }
}

function renderModels(models, details) {
  const body = $("#models tbody");
  body.replaceChildren();
  for (const m of models) {
    const row = document.createElement("tr");
    row.dataset.ticker = m.ticker;
    row.dataset.interval = m.interval;
    row.dataset.version = text(m.version);
    cell(row, m.ticker);
    cell(row, m.interval);
    cell(row, m.state, `state-${m.state}`);
    cell(row, m.version === undefined ? "" : `v${m.version}`);
    cell(row, m.kind);
    const metrics = m.metrics || {};
    cell(row, num(metrics.model && metrics.model.rmse), "num");
    cell(row, num(metrics.naive && metrics.naive.rmse), "num");
    cell(row, num(metrics.ratio_to_naive && metrics.ratio_to_naive.rmse), "num");
    const d = details[m.ticker];
    const iv = d && d.intervals.find((i) => i.interval === m.interval);
    versionsCell(row, iv ? iv.versions : []);
    body.appendChild(row);
  }
}

function chartData(history, forecast) {
  const xs = [];
  const actual = [];
  const predicted = [];
  for (const p of history.closes) {
    xs.push(Date.parse(p.ts) / 1000);
    actual.push(p.close);
    predicted.push(null);
  }
  // The forecast starts at the last stored close, so the two lines meet.
  if (predicted.length > 0) {
    predicted[predicted.length - 1] = actual[actual.length - 1];
  }
  for (const p of forecast.forecasts) {
    xs.push(Date.parse(p.ts) / 1000);
    actual.push(null);
    predicted.push(p.close);
  }
  return [xs, actual, predicted];
}

async function refreshChart(m) {
  const id = `${m.ticker} ${m.interval}`;
  const q = `ticker=${encodeURIComponent(m.ticker)}&interval=${m.interval}`;
  const [history, forecast] = await Promise.all([
    getJson(`/ml/history?${q}&n=${HISTORY}`),
    getJson(`/ml/forecast?${q}&n_steps=${STEPS}`),
  ]);
  const data = chartData(history, forecast);
  const model = forecast.model;
  const title = `${m.ticker} ${m.interval} · v${model.version} ${model.kind}`;
  const note = `trained ${model.trained_at.slice(0, 19).replace("T", " ")} UTC on data to ${model.data_watermark.slice(0, 10)}`;
  let c = charts.get(id);
  if (!c) {
    const el = document.createElement("div");
    el.className = "chart";
    const h = document.createElement("h3");
    const p = document.createElement("p");
    p.className = "muted";
    const plotEl = document.createElement("div");
    el.append(h, p, plotEl);
    el.dataset.key = id;
    // In order of ticker and interval, whatever order the fetches end in.
    const after = [...$("#charts").children].find((c) => c.dataset.key > id);
    $("#charts").insertBefore(el, after || null);
    const plot = new uPlot(
      {
        width: Math.max(plotEl.clientWidth, 300),
        height: 220,
        legend: { show: true },
        // Bars evenly spaced (nights, weekends and holidays take no room).
        scales: { x: { time: true, distr: 2 } },
        series: [
          {},
          { label: "close", stroke: "#1b1f24", width: 1.5 },
          { label: `forecast (${STEPS} steps)`, stroke: "#cf222e", width: 2 },
        ],
        axes: [{}, { size: 60 }],
      },
      data,
      plotEl,
    );
    c = { el, h, p, plot };
    charts.set(id, c);
  } else {
    c.plot.setData(data);
  }
  c.el.dataset.ticker = m.ticker;
  c.el.dataset.interval = m.interval;
  c.el.dataset.version = String(model.version);
  c.h.textContent = title;
  c.p.textContent = note;
}

function renderCluster(cl) {
  const nodes = $("#nodes tbody");
  nodes.replaceChildren();
  for (const n of cl.nodes) {
    const row = document.createElement("tr");
    cell(row, n.node);
    cell(row, n.roles.join(", "));
    cell(row, n.state);
    nodes.appendChild(row);
  }
  $("#coordinator").textContent = cl.coordinator ? "coordinator: reachable" : "coordinator: not reachable";
  const jobs = $("#jobs tbody");
  jobs.replaceChildren();
  for (const j of cl.jobs) {
    const row = document.createElement("tr");
    cell(row, `${j.ticker} ${j.interval} (${j.job})`);
    cell(row, j.state);
    cell(row, j.node);
    cell(row, j.version ? `v${j.version}` : "");
    cell(row, j.attempts, "num");
    jobs.appendChild(row);
  }
}

let refreshing = null;
async function refreshAll() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    try {
      const { models } = await getJson("/ml/models");
      const details = {};
      const tickers = [...new Set(models.map((m) => m.ticker))];
      await Promise.all(
        tickers.map(async (t) => {
          try {
            details[t] = await getJson(`/ml/models/${encodeURIComponent(t)}`);
          } catch (e) {
            console.warn(e.message);
          }
        }),
      );
      renderModels(models, details);
      const serving = models.filter((m) => m.state === "serving");
      await Promise.all(
        serving.map((m) => refreshChart(m).catch((e) => console.warn(e.message))),
      );
      for (const [id, c] of charts) {
        if (!serving.some((m) => `${m.ticker} ${m.interval}` === id)) {
          c.el.remove();
          charts.delete(id);
        }
      }
      renderCluster(await getJson("/ml/cluster"));
      renderEvents((await getJson("/ml/events?limit=30")).events);
      $("#updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
      document.body.dataset.ready = "true";
    } catch (e) {
      console.warn(`refresh failed: ${e.message}`);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

// The cluster's model events (the coordinator's promotions, rejections,
// operators' promotions and rollbacks; every serve node's served, refused
// and retried versions), newest first.
function renderEvents(events) {
  const ul = $("#events");
  ul.replaceChildren();
  for (const ev of events) {
    const li = document.createElement("li");
    li.className = `ev-${ev.kind}`;
    const at = ev.at.slice(0, 19).replace("T", " ");
    const detail = ev.detail ? `: ${ev.detail}` : "";
    li.textContent = `${at} ${ev.ticker} ${ev.interval} v${ev.version} ${ev.kind.replace(/_/g, " ")} (${ev.node})${detail}`;
    ul.appendChild(li);
  }
}

// This node's live events: a banner for a version served (the list is
// refreshed from the cluster's events right after).
function showEvent(ev) {
  const what = {
    served: `now serving v${ev.version}${ev.previous ? ` (was v${ev.previous})` : ""}`,
    refused: `v${ev.version} refused: ${ev.detail}`,
    retrying: `v${ev.version} load failed, retrying: ${ev.detail}`,
  }[ev.kind] || `${ev.kind} v${ev.version}`;
  if (ev.kind === "served") {
    const b = $("#banner");
    b.textContent = `${ev.ticker} ${ev.interval}: ${what}`;
    b.dataset.version = String(ev.version);
    b.hidden = false;
  }
}

function listen() {
  const es = new EventSource("/events");
  es.onopen = () => {
    $("#live").textContent = "live";
    $("#live").className = "badge on";
  };
  es.onerror = () => {
    // The browser reconnects on its own.
    $("#live").textContent = "reconnecting…";
    $("#live").className = "badge off";
  };
  es.addEventListener("model", (e) => {
    showEvent(JSON.parse(e.data));
    refreshAll();
  });
}

listen();
refreshAll();
setInterval(refreshAll, POLL_MS);
