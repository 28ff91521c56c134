// The Run page: polls /api/run (metrics.jsonl, the plan, the served weights) and redraws the curves;
// fetches /api/report (confusion matrix, mistakes) of the served weights when asked.
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("poll") || 2000);
const SVG = "http://www.w3.org/2000/svg";
let served = null;      // the served weights as /api/run describes them
let reported = null;    // the weights the shown report is of

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ticks(lo, hi, n) {
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n || 1)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(v);
  return out;
}

// A line chart of series [{values: [[x, y], ...], colour}] into an <svg viewBox="0 0 360 200">.
function chart(svg, series, format) {
  svg.replaceChildren();
  const W = 360, H = 200, L = 52, R = 10, T = 10, B = 28;
  const points = series.flatMap((s) => s.values);
  if (points.length === 0) { svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#677085" }, "no epochs yet")); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  for (const v of ticks(y0, y1, 4)) {
    svg.append(el("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#e3e6ee" }));
    svg.append(el("text", { x: L - 5, y: Y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#677085" }, format(v)));
  }
  for (const v of ticks(x0, x1, 6).filter(Number.isInteger)) {
    svg.append(el("text", { x: X(v), y: H - 10, "text-anchor": "middle", "font-size": 11, fill: "#677085" }, v));
  }
  for (const s of series) {
    if (s.values.length > 1) {
      svg.append(el("polyline", { points: s.values.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none",
                                  stroke: s.colour, "stroke-width": 2 }));
    }
    for (const [x, y] of s.values) svg.append(el("circle", { cx: X(x), cy: Y(y), r: 3, fill: s.colour }));
  }
}

function text(id, value) { document.getElementById(id).textContent = value; }

function render(run) {
  const epochs = run.epochs, last = epochs[epochs.length - 1];
  text("run-dir", run.run_dir);
  text("epochs", epochs.length ? `${last.epoch}${run.planned_epochs ? " / " + run.planned_epochs : ""}` : "0");
  document.getElementById("epochs").dataset.count = epochs.length;
  text("accuracy", last ? (100 * last.test_accuracy).toFixed(2) + "%" : "-");
  text("loss", last ? last.test_loss.toFixed(4) : "-");
  text("speed", last ? Math.round(last.train_samples_per_second).toLocaleString("en") : "-");
  text("state", run.finished ? "finished" : (epochs.length ? "training" : "starting"));
  text("updated", `Updated ${new Date().toLocaleTimeString()}; refreshed every ${POLL_MS / 1000} s while this page is open.`);
  const e = (key) => epochs.map((r) => [r.epoch, r[key]]);
  chart(document.getElementById("chart-loss"), [{ values: e("train_loss"), colour: "#2f6fde" },
                                               { values: e("test_loss"), colour: "#e67e22" }], (v) => String(+v.toPrecision(3)));
  chart(document.getElementById("chart-accuracy"), [{ values: e("test_accuracy").map(([x, y]) => [x, 100 * y]), colour: "#1f8a4c" }],
        (v) => v.toFixed(1) + "%");
  chart(document.getElementById("chart-speed"), [{ values: e("train_samples_per_second"), colour: "#7d3cc8" }],
        (v) => v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k" : v.toFixed(0));

  const plan = document.getElementById("plan");
  plan.replaceChildren();
  const rows = Object.entries(run.plan).filter(([, v]) => v !== null && v !== undefined);
  rows.push(["served weights", run.model ? run.model.source : "none yet"]);
  for (const [k, v] of rows) {
    const tr = plan.insertRow();
    const th = document.createElement("th"); th.textContent = k; tr.append(th);
    tr.insertCell().textContent = v;
  }
  const problem = document.getElementById("model-problem");
  problem.hidden = !run.model_problem;
  problem.textContent = run.model_problem || "";

  served = run.model;
  updateButton();
}

function updateButton() {
  const button = document.getElementById("report-button");
  const current = reported && served && reported.key === served.key;
  button.disabled = !served || current;
  button.hidden = current;
  button.textContent = !served ? "Compute (no weights yet)" :
    (reported ? `Update to ${served.source}` : `Compute for ${served.source}`);
}

async function poll() {
  try {
    const r = await fetch("/api/run", { cache: "no-store" });
    if (r.ok) render(await r.json());
  } catch (err) {
    text("updated", "The server does not answer (stopped?): " + err);
  }
  setTimeout(poll, POLL_MS);
}

function digitCanvas(image) {
  const c = document.createElement("canvas"); c.width = c.height = 28;
  const g = c.getContext("2d"), px = g.createImageData(28, 28);
  image.flat().forEach((v, i) => px.data.set([v, v, v, 255], 4 * i));
  g.putImageData(px, 0, 0);
  return c;
}

async function loadReport() {
  const button = document.getElementById("report-button");
  button.disabled = true;
  text("report-note", "Computing on the test set...");
  let r, report;
  try {
    r = await fetch("/api/report", { cache: "no-store" });
    report = await r.json();
  } catch (err) {
    r = { ok: false }; report = { error: "no answer from the server: " + err };
  }
  if (!r.ok) { text("report-note", report.error); button.disabled = false; return; }
  reported = report.model;
  text("report-note", `${report.model.source}: ${(100 * report.accuracy).toFixed(2)}% ` +
       `(${report.correct.toLocaleString("en")} of ${report.samples.toLocaleString("en")} test images). ` +
       "Rows: the true digit; columns: what the model said.");
  const out = document.getElementById("report");
  out.replaceChildren();
  const wrap = document.createElement("div"); wrap.className = "scroll";
  const table = document.createElement("table"); table.className = "confusion";
  const head = table.createTHead().insertRow();
  for (const h of ["true", ..."0123456789", "accuracy"]) { const th = document.createElement("th"); th.textContent = h; head.append(th); }
  report.confusion_matrix.forEach((row, t) => {
    const tr = table.insertRow();
    const th = document.createElement("th"); th.textContent = t; tr.append(th);
    row.forEach((n, p) => {
      const td = tr.insertCell(); td.textContent = n;
      td.className = p === t ? "hit" : (n ? "miss" : "zero");
    });
    const acc = report.per_class_accuracy[t];
    tr.insertCell().textContent = acc === null ? "-" : (100 * acc).toFixed(1) + "%";
  });
  wrap.append(table);
  const grid = document.createElement("div"); grid.className = "mistakes";
  for (const m of report.mistakes) {
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = `${m.label} read as ${m.predicted} (${(100 * m.confidence).toFixed(0)}%)`;
    fig.append(digitCanvas(m.image), cap);
    grid.append(fig);
  }
  const h = document.createElement("h2"); h.textContent = `The ${report.mistakes.length} most confident mistakes`;
  h.style.marginTop = "1rem";
  out.append(wrap, h, grid);
  updateButton();
}

document.getElementById("report-button").addEventListener("click", loadReport);
poll();
