// The Draw page: strokes on a canvas (mouse, touch or pen, through pointer events), sent as a PNG to
// /api/predict after every change; the answer shows the digit, the 28 x 28 view and ten bars.
// body[data-drawn] counts changes to the drawing, body[data-predicted] the change the answer is for.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const view = document.getElementById("view").getContext("2d");
const LINE = pad.width / 12;  // pen width: about MNIST's stroke for a digit drawn across most of the pad
let strokes = [];             // each stroke a list of [x, y] in canvas pixels
let current = null;
let drawn = 0;                // version of the drawing
let busy = false, dirty = false;

const bars = document.getElementById("bars");
const fills = [], pcts = [], rows = [];
for (let d = 0; d < 10; d++) {
  const label = document.createElement("span"); label.textContent = d;
  const bar = document.createElement("div"); bar.className = "bar";
  const fill = document.createElement("span"); bar.appendChild(fill);
  const pct = document.createElement("span"); pct.className = "pct";
  bars.append(label, bar, pct);
  fills.push(fill); pcts.push(pct); rows.push(bar);
}

function paint() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = ctx.fillStyle = "#000";
  ctx.lineWidth = LINE; ctx.lineCap = "round"; ctx.lineJoin = "round";
  for (const s of strokes) {
    ctx.beginPath();
    if (s.length === 1) { ctx.arc(s[0][0], s[0][1], LINE / 2, 0, 2 * Math.PI); ctx.fill(); continue; }
    ctx.moveTo(s[0][0], s[0][1]);
    for (const [x, y] of s.slice(1)) ctx.lineTo(x, y);
    ctx.stroke();
  }
  document.getElementById("undo").disabled = document.getElementById("clear").disabled = strokes.length === 0;
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function changed() {
  drawn += 1;
  document.body.dataset.drawn = drawn;
  paint();
  if (strokes.length === 0) { show(null); return; }
  if (busy) { dirty = true; } else { send(); }
}

function send() {
  busy = true; dirty = false;
  const version = drawn;
  pad.toBlob(async (png) => {
    try {
      const r = await fetch("/api/predict", { method: "POST", headers: { "Content-Type": "image/png" }, body: png });
      const answer = await r.json();
      if (version === drawn) {
        if (r.ok) show(answer); else status(answer.error || r.statusText, true);
        document.body.dataset.predicted = version;
      }
    } catch (err) {
      status("no answer from the server: " + err, true);
    } finally {
      busy = false;
      if (dirty) send();
    }
  }, "image/png");
}

function status(text, problem) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = problem ? "problem" : "muted";
}

function show(answer) {
  document.getElementById("digit").textContent = answer ? answer.digit : "?";
  const pixels = view.createImageData(28, 28);
  for (let i = 0; i < 28 * 28; i++) {
    const v = answer ? answer.image[Math.floor(i / 28)][i % 28] : 0;
    pixels.data.set([v, v, v, 255], 4 * i);
  }
  view.putImageData(pixels, 0, 0);
  for (let d = 0; d < 10; d++) {
    const p = answer ? answer.probabilities[d] : 0;
    fills[d].style.width = (100 * p).toFixed(1) + "%";
    pcts[d].textContent = answer ? (100 * p).toFixed(1) + "%" : "";
    rows[d].classList.toggle("top", answer !== null && d === answer.digit);
  }
  if (answer) {
    document.getElementById("source").textContent = "model: " + answer.model.source;
    status(`${answer.digit}, with probability ${(100 * answer.probabilities[answer.digit]).toFixed(1)}%`);
  } else {
    delete document.body.dataset.predicted;
    status("Draw a digit: the answer follows every stroke.");
  }
}

pad.addEventListener("pointerdown", (e) => {
  if (e.button !== 0) return;
  pad.setPointerCapture(e.pointerId);
  current = [point(e)];
  strokes.push(current);
  changed();
});
pad.addEventListener("pointermove", (e) => {
  if (!current) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
  for (const c of (events.length ? events : [e])) current.push(point(c));
  changed();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => { current = null; });
}
document.getElementById("undo").addEventListener("click", () => { strokes.pop(); changed(); });
document.getElementById("clear").addEventListener("click", () => { strokes = []; changed(); });
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { strokes.pop(); changed(); }
  if (e.key === "Escape") { strokes = []; changed(); }
});
paint();
show(null);
fetch("/api/run").then((r) => r.json()).then((run) => {  // which weights answer, before the first stroke
  document.getElementById("source").textContent = run.model ? "model: " + run.model.source : "no weights yet";
}).catch(() => {});
