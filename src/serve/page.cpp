// The page of `microdit serve`: a Generate tab (prompt -> pictures, one by one) and a
// Training tab (loss curves, learning rate, throughput, ETA and sample grids of the runs).
// Plain HTML/CSS/JS; charts are drawn on <canvas> here. URL parameters: ?prompt=...&n=&steps=
// &cfg=&seed=&autorun=1 fills the form (and submits it), ?tab=train opens the dashboard.
#include "serve/page.h"

namespace microdit::serve {

const char* page_html() {
  return R"PAGE(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>microdit</title>
<style>
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#667085; --line:#e3e6eb; --acc:#2f6fde; --acc2:#e8590c; --ok:#2b8a3e; --bad:#c92a2a; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:16px; flex-wrap:wrap; padding:10px 18px; background:var(--card); border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; }
header h1 { font-size:18px; margin:0; letter-spacing:.3px; }
header h1 span { color:var(--acc); }
nav { display:flex; gap:4px; }
nav button { border:1px solid var(--line); background:var(--bg); padding:6px 14px; border-radius:8px; cursor:pointer; font:inherit; color:var(--ink); }
nav button.on { background:var(--acc); color:#fff; border-color:var(--acc); }
#model { color:var(--muted); font-size:12px; flex:1 1 260px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
main { max-width:1200px; margin:0 auto; padding:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:14px 16px; margin-bottom:16px; }
.row { display:flex; gap:14px; flex-wrap:wrap; align-items:flex-end; }
label { display:flex; flex-direction:column; gap:4px; font-size:13px; color:var(--muted); }
textarea, input, select { font:inherit; color:var(--ink); border:1px solid var(--line); border-radius:8px; padding:7px 9px; background:#fff; }
textarea { width:100%; min-height:64px; resize:vertical; }
input[type=number] { width:110px; }
input[type=range] { width:180px; padding:0; }
.btn { font:inherit; border:0; border-radius:8px; padding:9px 18px; background:var(--acc); color:#fff; cursor:pointer; }
.btn:disabled { opacity:.55; cursor:default; }
.btn.small { padding:4px 10px; font-size:13px; }
.btn.ghost { background:var(--bg); color:var(--ink); border:1px solid var(--line); }
.seed { display:flex; gap:6px; }
.muted { color:var(--muted); font-size:13px; }
.err { color:var(--bad); font-size:14px; min-height:1.2em; margin-top:8px; }
.progress { height:6px; background:var(--line); border-radius:3px; overflow:hidden; margin-top:10px; }
.progress > div { height:100%; width:0; background:var(--acc); transition:width .25s; }
.progress.busy > div { background:repeating-linear-gradient(45deg,var(--acc),var(--acc) 8px,#6f9ae8 8px,#6f9ae8 16px); }
.gen h3 { margin:0 0 4px; font-size:15px; word-break:break-word; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(150px,1fr)); gap:12px; margin-top:10px; }
.cell { border:1px solid var(--line); border-radius:10px; padding:6px; background:var(--bg); }
.cell img { width:100%; aspect-ratio:1/1; object-fit:contain; image-rendering:pixelated; display:block; background:#fff; border-radius:6px; }
.cell .meta { display:flex; justify-content:space-between; align-items:center; font-size:12px; color:var(--muted); margin-top:5px; gap:4px; }
.cell a { color:var(--acc); text-decoration:none; }
.cell.wait img { visibility:hidden; }
.cell.wait { display:flex; align-items:center; justify-content:center; min-height:120px; color:var(--muted); font-size:12px; }
code.cmd { display:block; background:#f0f2f5; border-radius:6px; padding:6px 8px; font-size:12px; overflow-x:auto; white-space:pre; margin:0; }
.stats { display:grid; grid-template-columns:repeat(auto-fill,minmax(140px,1fr)); gap:10px; }
.stat { background:var(--bg); border-radius:10px; padding:8px 10px; }
.stat b { display:block; font-size:18px; }
.stat span { font-size:12px; color:var(--muted); }
canvas { width:100%; height:300px; display:block; }
canvas.small { height:160px; }
.runs { display:flex; gap:6px; flex-wrap:wrap; }
.pill { font-size:12px; border-radius:10px; padding:2px 8px; background:var(--line); }
.pill.live { background:#d3f9d8; color:var(--ok); }
.samples img { max-width:100%; image-rendering:pixelated; border-radius:6px; border:1px solid var(--line); }
.samples ol { margin:6px 0 0; padding-left:22px; font-size:13px; color:var(--muted); }
.legend { display:flex; gap:14px; font-size:12px; color:var(--muted); }
.legend i { display:inline-block; width:14px; height:3px; vertical-align:middle; margin-right:4px; }
@media (max-width:600px) {
  main { padding:10px; } .card { padding:12px; }
  input[type=range] { width:100%; } .row > label { flex:1 1 45%; }
  .grid { grid-template-columns:repeat(2,1fr); } canvas { height:220px; }
}
</style>
</head>
<body>
<header>
  <h1>micro<span>dit</span></h1>
  <nav><button id="tab-gen" class="on">Generate</button><button id="tab-train">Training</button></nav>
  <div id="model">loading model information...</div>
</header>
<main>
<section id="gen">
  <form class="card" id="form" autocomplete="off">
    <label>Prompt<textarea id="prompt" maxlength="1000" placeholder="red heart, smileys &amp; emotion, heart, mostly red" required></textarea></label>
    <div class="row" style="margin-top:10px">
      <label>Guidance <span class="muted" id="cfgv">4.0</span><input type="range" id="cfg" min="0" max="12" step="0.5" value="4"></label>
      <label>Steps<input type="number" id="steps" min="1" max="200" value="30"></label>
      <label>Seed<span class="seed"><input type="number" id="seed" min="0" value="0"><button type="button" class="btn ghost small" id="dice" title="random seed" aria-label="random seed">&#127922;</button></span></label>
      <label>Images<input type="number" id="n" min="1" max="16" value="4"></label>
      <button class="btn" id="go" type="submit">Generate</button>
    </div>
    <div class="progress" id="bar"><div></div></div>
    <div class="muted" id="status">&nbsp;</div>
    <div class="err" id="err"></div>
  </form>
  <div id="gens"></div>
</section>
<section id="train" hidden>
  <div class="card"><div class="row" style="justify-content:space-between;align-items:center">
    <div class="runs" id="runs"></div><span class="muted" id="runs-note"></span></div></div>
  <div id="run" hidden>
    <div class="card"><div class="stats" id="stats"></div></div>
    <div class="card"><div class="row" style="justify-content:space-between;align-items:center"><b>Loss</b>
      <div class="legend"><span><i style="background:#9db8ee"></i>loss</span><span><i style="background:#2f6fde"></i>smoothed</span><span><i style="background:#e8590c"></i>validation</span></div></div>
      <canvas id="loss"></canvas></div>
    <div class="card"><b>Learning rate</b><canvas id="lr" class="small"></canvas></div>
    <div class="card samples"><b>Sample grids</b> <span class="muted" id="grid-note"></span><div id="samples"></div></div>
  </div>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let limits = { max_images: 16, max_steps: 200, max_cfg: 100, max_seed: 9007199254740991 };
let currentRun = null, trainTimer = null;

function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
async function api(url, opts) {
  const r = await fetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: r.status + " " + r.statusText }; }
  if (!r.ok) throw new Error(body && body.error ? body.error : ("HTTP " + r.status));
  return body;
}
function fmtNum(v, d) { return v === null || v === undefined || !isFinite(v) ? "-" : Number(v).toFixed(d); }
function fmtTime(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
  return h ? h + "h " + String(m).padStart(2, "0") + "m" : m + "m " + String(x).padStart(2, "0") + "s";
}

// ---- tabs -------------------------------------------------------------------------
function show(tab) {
  $("gen").hidden = tab !== "gen"; $("train").hidden = tab !== "train";
  $("tab-gen").classList.toggle("on", tab === "gen"); $("tab-train").classList.toggle("on", tab === "train");
  clearTimeout(trainTimer);
  if (tab === "train") loadRuns();
}
$("tab-gen").onclick = () => show("gen");
$("tab-train").onclick = () => show("train");

// ---- generate ---------------------------------------------------------------------
$("cfg").oninput = () => { $("cfgv").textContent = Number($("cfg").value).toFixed(1); };
$("dice").onclick = () => { $("seed").value = Math.floor(Math.random() * 1e9); };

function setBusy(busy, frac, text) {
  $("go").disabled = busy;
  $("bar").classList.toggle("busy", busy && frac === 0);
  $("bar").firstElementChild.style.width = (busy && frac === 0 ? 100 : frac * 100) + "%";
  $("status").textContent = text || "\u00a0";
}

function jobCard(job) {
  let card = document.getElementById("job-" + job.id);
  if (!card) {
    card = document.createElement("div");
    card.className = "card gen"; card.id = "job-" + job.id;
    card.innerHTML = `<h3>${esc(job.prompt)}</h3>
      <div class="muted">${job.n} image(s) &middot; ${job.steps} steps &middot; guidance ${job.cfg} &middot; seeds ${job.seed}&ndash;${job.seed + job.n - 1} &middot; <span class="st"></span></div>
      <div class="row" style="align-items:center;gap:8px;flex-wrap:nowrap;margin-top:6px"><code class="cmd" style="flex:1;min-width:0">${esc(job.command)}</code>
      <button type="button" class="btn ghost small copy" title="copy the command">copy</button></div><div class="grid"></div>`;
    card.querySelector(".copy").onclick = (ev) => {
      const ok = () => { ev.target.textContent = "copied"; setTimeout(() => { ev.target.textContent = "copy"; }, 1500); };
      if (navigator.clipboard) navigator.clipboard.writeText(job.command).then(ok, () => {}); };
    const grid = card.querySelector(".grid");
    for (let i = 0; i < job.n; i++) {
      const c = document.createElement("div");
      c.className = "cell wait"; c.textContent = "waiting...";
      grid.appendChild(c);
    }
    $("gens").prepend(card);
  }
  return card;
}

function updateCard(job) {
  const card = jobCard(job);
  const st = job.status === "done" ? `done in ${job.seconds.toFixed(1)} s` : job.status === "queued" ? `queued (position ${job.position})`
    : job.status === "running" ? `${job.done}/${job.total} made` : job.status + (job.error ? ": " + job.error : "");
  card.querySelector(".st").textContent = st;
  const cells = card.querySelectorAll(".cell");
  for (const im of job.images) {
    const c = cells[im.index];
    if (!c || !c.classList.contains("wait")) continue;
    c.className = "cell"; c.textContent = "";
    const img = new Image();
    img.className = "gen-img"; img.alt = `${job.prompt} (seed ${im.seed})`;
    img.onload = () => { img.dataset.loaded = img.naturalWidth > 0 ? "1" : "0"; };
    img.src = im.url;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = `<span title="reproduce: --seed ${im.seed} --n 1">seed ${im.seed}</span><a href="${esc(im.url)}" download="microdit-seed${im.seed}.png" class="dl">&#8595; PNG</a>`;
    c.append(img, meta);
  }
  if (job.status !== "queued" && job.status !== "running")
    for (const c of cells) if (c.classList.contains("wait")) c.textContent = job.status;
}

async function follow(job) {
  updateCard(job);
  let last = -1, status = "";
  while (true) {
    if (job.status === "queued") setBusy(true, 0, `queued: ${job.position} ahead of you`);
    else if (job.status === "running") setBusy(true, job.done / job.total, `sampling: ${job.done} of ${job.total} images`);
    if (job.status !== "queued" && job.status !== "running") break;
    if (job.done !== last || job.status !== status) { last = job.done; status = job.status; }
    job = await api(`/api/jobs/${job.id}?after=${job.done}`);
    updateCard(job);
  }
  setBusy(false, 1, job.status === "done" ? `${job.n} image(s) in ${job.seconds.toFixed(1)} s` : "");
  if (job.status === "error") $("err").textContent = job.error;
}

$("form").onsubmit = async (ev) => {
  ev.preventDefault();
  $("err").textContent = "";
  const body = { prompt: $("prompt").value.trim(), n: Number($("n").value), steps: Number($("steps").value),
                 cfg: Number($("cfg").value), seed: Number($("seed").value) };
  if (!body.prompt) { $("err").textContent = "type a prompt first"; return; }
  setBusy(true, 0, "sending...");
  try {
    const job = await api("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    await follow(job);
  } catch (e) {
    setBusy(false, 0, "");
    $("err").textContent = e.message;
  }
};

async function init() {
  try {
    const info = await api("/api/info");
    limits = info.limits;
    $("model").textContent = info.model; $("model").title = info.model;
    $("n").max = limits.max_images; $("steps").max = limits.max_steps; $("seed").max = limits.max_seed;
    $("prompt").maxLength = limits.max_prompt_bytes;
  } catch (e) { $("model").textContent = "server not reachable: " + e.message; }
  try {  // generations the server still holds (newest first): show them below
    const jobs = (await api("/api/jobs")).jobs;
    for (const j of jobs.slice().reverse()) updateCard(j);
    const live = jobs.find(j => j.status === "running" || j.status === "queued");
    if (live) follow(live);
  } catch (e) {}
  for (const k of ["prompt", "n", "steps", "cfg", "seed"]) if (params.has(k)) $(k).value = params.get(k);
  $("cfg").oninput();
  if (params.get("tab") === "train") show("train");
  else if (params.get("autorun") === "1" && $("prompt").value) $("form").requestSubmit();
}

// ---- training dashboard ---------------------------------------------------------------
async function loadRuns() {
  clearTimeout(trainTimer);
  let runs = [];
  try { runs = (await api("/api/runs")).runs; } catch (e) { $("runs-note").textContent = e.message; }
  const box = $("runs"); box.innerHTML = "";
  if (!runs.length) { $("runs-note").textContent = "no runs yet (a run is a folder with metrics.jsonl or checkpoints/)"; $("run").hidden = true; }
  else $("runs-note").textContent = runs.length + " run(s)";
  if (!currentRun || !runs.some(r => r.name === currentRun))
    currentRun = (runs.find(r => r.training) || runs[0] || {}).name || null;
  for (const r of runs) {
    const b = document.createElement("button");
    b.className = "btn small" + (r.name === currentRun ? "" : " ghost");
    b.innerHTML = esc(r.name) + (r.training ? ' <span class="pill live">live</span>' : "");
    b.onclick = () => { currentRun = r.name; loadRuns(); };
    box.appendChild(b);
  }
  if (currentRun) await loadRun(runs.find(r => r.name === currentRun));
  if (!$("train").hidden) trainTimer = setTimeout(loadRuns, 3000);
}

async function loadRun(s) {
  $("run").hidden = false;
  const total = s.total_steps ? " / " + s.total_steps : "";
  const pct = s.total_steps ? ` (${(100 * s.step / s.total_steps).toFixed(0)} %)` : "";
  $("stats").innerHTML = [
    ["step", s.step + total + pct], ["loss", fmtNum(s.loss, 4)], ["validation loss", fmtNum(s.val_loss, 4)],
    ["learning rate", s.lr === null ? "-" : Number(s.lr).toExponential(2)], ["images / s", fmtNum(s.images_per_s, 1)],
    ["ETA", s.training ? fmtTime(s.eta_s) : (s.total_steps && s.step >= s.total_steps ? "finished" : "not running")],
  ].map(([k, v]) => `<div class="stat"><span>${k}</span><b>${esc(v)}</b></div>`).join("");
  try {
    const m = await api(`/api/runs/${encodeURIComponent(s.name)}/metrics`);
    const steps = m.train.map(r => r[0]), loss = m.train.map(r => r[1]);
    const smooth = []; let e = null;
    for (const v of loss) { if (v !== null) e = e === null ? v : 0.9 * e + 0.1 * v; smooth.push(e); }
    drawChart($("loss"), [
      { x: steps, y: loss, color: "#9db8ee", width: 1 },
      { x: steps, y: smooth, color: "#2f6fde", width: 2 },
      { x: m.val.map(r => r[0]), y: m.val.map(r => r[1]), color: "#e8590c", width: 2, dots: true },
    ]);
    drawChart($("lr"), [{ x: steps, y: m.train.map(r => r[2]), color: "#2b8a3e", width: 2 }], true);
  } catch (e) {}
  try {
    const sm = await api(`/api/runs/${encodeURIComponent(s.name)}/samples`);
    const items = sm.grids.slice(0, 3).map(g => ({ title: "step " + g.step, url: g.url, prompts: g.prompts }))
      .concat(sm.pictures.map(p => ({ title: p.file, url: p.url, prompts: p.prompts })));
    $("grid-note").textContent = sm.grids.length ? `(latest of ${sm.grids.length} during training)` : "";
    const html = items.map(it => `<div style="margin-top:12px"><div class="muted">${esc(it.title)}</div>
      <img src="${esc(it.url)}?v=${s.step}" alt="${esc(it.title)}" loading="lazy">
      ${it.prompts.length ? "<ol>" + it.prompts.map(p => "<li>" + esc(p) + "</li>").join("") + "</ol>" : ""}</div>`).join("");
    if ($("samples").dataset.html !== html) {
      $("samples").innerHTML = html || '<p class="muted">no sample grids yet</p>'; $("samples").dataset.html = html;
      for (const img of $("samples").querySelectorAll("img"))  // small grids: enlarged, pixels kept sharp
        img.onload = () => { const k = Math.floor(480 / img.naturalWidth); if (k > 1) img.style.width = img.naturalWidth * k + "px"; };
    }
  } catch (e) {}
}

// Lines on a canvas: axes with "nice" ticks, y range from the data (null values skipped).
function niceStep(span, n) {
  const raw = span / n, p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
}
function drawChart(cv, series, expo) {
  const dpr = window.devicePixelRatio || 1, W = cv.clientWidth, H = cv.clientHeight;
  cv.width = W * dpr; cv.height = H * dpr;
  const g = cv.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, W, H);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const s of series) s.x.forEach((x, i) => { const y = s.y[i]; if (y === null || !isFinite(y)) return;
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); });
  g.font = "11px system-ui, sans-serif"; g.fillStyle = "#667085";
  if (!isFinite(x0)) { g.fillText("no data yet", 10, 20); return; }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y0) * 0.1 + 1e-9; y0 -= Math.abs(y0) * 0.1 + 1e-9; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const L = 58, R = 10, T = 8, B = 22, pw = W - L - R, ph = H - T - B;
  const X = x => L + (x - x0) / (x1 - x0) * pw, Y = y => T + (1 - (y - y0) / (y1 - y0)) * ph;
  g.strokeStyle = "#e3e6eb"; g.lineWidth = 1; g.textAlign = "right"; g.textBaseline = "middle";
  const ys = niceStep(y1 - y0, 5);
  for (let v = Math.ceil(y0 / ys) * ys; v <= y1; v += ys) {
    g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(W - R, Y(v)); g.stroke();
    g.fillText(expo ? v.toExponential(1) : Number(v.toPrecision(4)).toString(), L - 6, Y(v));
  }
  g.textAlign = "center"; g.textBaseline = "top";
  const xs = Math.max(1, niceStep(x1 - x0, Math.max(2, Math.floor(pw / 90))));  // steps are integers
  for (let v = Math.ceil(x0 / xs) * xs; v <= x1; v += xs) g.fillText(String(Math.round(v)), X(v), H - B + 5);
  for (const s of series) {
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = s.width; g.beginPath();
    let pen = false;
    s.x.forEach((x, i) => { const y = s.y[i]; if (y === null || !isFinite(y)) { pen = false; return; }
      if (pen) g.lineTo(X(x), Y(y)); else g.moveTo(X(x), Y(y)); pen = true; });
    g.stroke();
    if (s.dots) s.x.forEach((x, i) => { const y = s.y[i]; if (y === null) return; g.beginPath(); g.arc(X(x), Y(y), 2.5, 0, 7); g.fill(); });
  }
}
window.addEventListener("resize", () => { if (!$("train").hidden && currentRun) loadRuns(); });
init();
</script>
</body>
</html>
)PAGE";
}

}  // namespace microdit::serve
