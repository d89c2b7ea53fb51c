// The Weir dashboard: one page, three views (#/system, #/queues, #/sagas), fed by the
// snapshots of /api/events. No framework, nothing fetched from elsewhere.
"use strict";

let snap = null;          // the latest snapshot
let route = "";           // the route drawn last
const view = {};          // per-route state kept across snapshots

// How actions are turned on where this dashboard runs.
function enableActions() {
  return snap && snap.source === "cluster"
    ? "install the chart with dashboard.actions=true"
    : "start weir up with --dashboard-actions";
}

const $ = (sel, root) => (root || document).querySelector(sel);
function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, c =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const enc = encodeURIComponent;
function num(v, digits) {
  if (v == null) return "–";
  return Number(v).toFixed(digits == null ? 1 : digits);
}
// `2026-01-02T03:04:05.678901Z` → `2026-01-02 03:04:05.678` (UTC, as the logs write it).
function when(ts) {
  if (!ts) return "";
  const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d{1,3})?/.exec(ts);
  return m ? `${m[1]} ${m[2]}${m[3] || ""}` : ts;
}
function pct(v) { return v == null ? "–" : (v * 100).toFixed(1) + "%"; }
function ms(v) { return v == null ? "–" : (v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(0) + " ms"); }
function state(word, extra) {
  return `<span class="state state-${esc(word)}">${esc(word)}${extra ? " " + esc(extra) : ""}</span>`;
}
function findings(list) {
  return (list || []).map(f =>
    `<div class="finding">${state(f.severity)}<b>${esc(f.rule)}</b>${esc(f.message)}</div>`).join("");
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: "not JSON" }; }
  return { status: r.status, ok: r.ok, data };
}

// A destructive button asks twice: the first click arms it, the second acts.
function armed(btn, label) {
  if (btn.classList.contains("armed")) return true;
  btn.classList.add("armed");
  btn.dataset.label = btn.textContent;
  btn.textContent = label || "Click again to confirm";
  setTimeout(() => {
    if (btn.isConnected && btn.classList.contains("armed")) {
      btn.classList.remove("armed");
      btn.textContent = btn.dataset.label;
    }
  }, 5000);
  return false;
}

// ---- System -----------------------------------------------------------------------------

function graphSvg(s) {
  const W = 210, H = 54, GX = 80, GY = 24, PAD = 20;
  // Layers: sagas first, then each service one right of its deepest caller (calls and saga
  // steps); queues in a last column.
  const layer = {};
  for (const g of s.sagas) layer["saga:" + g.name] = 0;
  for (const x of s.services) layer["ms:" + x.name] = 0;
  const links = s.calls.filter(c => !c.external).map(c => ["ms:" + c.from, "ms:" + c.to]);
  for (const g of s.sagas) for (const st of g.steps) links.push(["saga:" + g.name, "ms:" + st.target]);
  for (let i = 0; i < s.services.length + 1; i++) {
    let changed = false;
    for (const [a, b] of links) {
      if (a === b || layer[a] == null || layer[b] == null) continue;
      if (layer[b] < layer[a] + 1 && layer[a] + 1 <= s.services.length + 1) { layer[b] = layer[a] + 1; changed = true; }
    }
    if (!changed) break;
  }
  const cols = {};
  for (const x of s.services) (cols[layer["ms:" + x.name]] = cols[layer["ms:" + x.name]] || []).push({ kind: "svc", d: x });
  for (const g of s.sagas) (cols[0] = cols[0] || []).push({ kind: "saga", d: g });
  const maxLayer = Math.max(0, ...Object.keys(cols).map(Number));
  const layers = [];
  for (let i = 0; i <= maxLayer; i++) layers.push(cols[i] || []);
  if (s.queues.length) layers.push(s.queues.map(q => ({ kind: "queue", d: q })));
  const pos = {};
  let height = 0;
  layers.forEach((nodes, x) => {
    nodes.forEach((n, y) => {
      const key = (n.kind === "svc" ? "ms:" : n.kind + ":") + n.d.name;
      pos[key] = { x: PAD + x * (W + GX), y: PAD + y * (H + GY), n };
      height = Math.max(height, PAD + (y + 1) * (H + GY));
    });
  });
  const width = PAD * 2 + layers.length * (W + GX) - GX;
  let edges = "", nodes = "", labels = "";
  const line = (a, b, cls, label, lcls) => {
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    let d;
    if (x2 > x1) d = `M${x1},${y1} C${x1 + 40},${y1} ${x2 - 40},${y2} ${x2},${y2}`;
    else d = `M${a.x + W / 2},${a.y + H} C${a.x + W / 2},${a.y + H + 40} ${b.x + W / 2},${b.y + H + 40} ${b.x + W / 2},${b.y + H}`;
    edges += `<path class="edge ${cls}" d="${d}" marker-end="url(#arrow)"/>`;
    if (label) {
      const lx = (x1 + x2) / 2, ly = (y1 + y2) / 2 - 5;
      labels += `<text class="elabel ${lcls || ""}" x="${lx}" y="${ly}">${esc(label)}</text>`;
    }
  };
  for (const c of s.calls) {
    const a = pos["ms:" + c.from], b = pos["ms:" + c.to];
    if (!a || !b) continue;
    const br = c.breaker === "open" ? "breaker open" : c.breaker === "half-open" ? "half-open" : "";
    const busy = c.window.rps > 0 ? `${num(c.window.rps)}/s ${pct(c.window.errorRate)}` : "";
    const label = `${busy} ${br}`.trim();
    line(a, b, c.breaker, label, c.breaker === "open" ? "open" : "");
  }
  for (const g of s.sagas) {
    const a = pos["saga:" + g.name];
    for (const st of g.steps) { const b = pos["ms:" + st.target]; if (a && b) line(a, b, "step"); }
  }
  for (const q of s.queues) {
    const b = pos["queue:" + q.name];
    for (const p of q.publishers) { const a = pos["ms:" + p] || pos["saga:" + p.replace(/^saga /, "")]; if (a && b) line(a, b, "event"); }
    for (const c of q.consumers) { const a = pos["ms:" + c]; if (a && b) line(b, a, "event"); }
    for (const t of q.triggers || []) { const a = pos["saga:" + t]; if (a && b) line(b, a, "event"); }
  }
  for (const key in pos) {
    const p = pos[key], d = p.n.d;
    let title = d.name, figures = "", cls = p.n.kind;
    if (p.n.kind === "svc") {
      const nf = (d.findings || []).length;
      title = `${d.name}${d.edge ? " (edge)" : ""} — ${d.state}${nf ? ` · ${nf} finding${nf > 1 ? "s" : ""}` : ""}`;
      figures = `${num(d.inbound.rps)} req/s · ${pct(d.inbound.errorRate)} err · p99 ${ms(d.inbound.p99Ms)}`;
      cls += " " + d.state;
    } else if (p.n.kind === "queue") {
      title = "queue " + d.name;
      const lag = Object.values(d.lag || {}).reduce((a, b) => a + b, 0);
      figures = `${d.messages == null ? "?" : d.messages} on stream · lag ${lag} · ${d.deadLetters == null ? "–" : d.deadLetters} dead`;
    } else {
      title = "saga " + d.name;
      const by = d.byStatus || {};
      figures = Object.keys(by).map(k => `${by[k]} ${k}`).join(" · ") || "no instances";
    }
    nodes += `<g class="node ${esc(cls)}" transform="translate(${p.x},${p.y})"><rect width="${W}" height="${H}"/>` +
      `<text x="8" y="20">${esc(title)}</text><text class="figures" x="8" y="40">${esc(figures)}</text></g>`;
  }
  return `<svg class="graph" viewBox="0 0 ${width} ${height + PAD}" role="img" aria-label="system graph">` +
    `<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8a8f96"/></marker></defs>` +
    edges + nodes + labels + `</svg>`;
}

function renderSystem(s) {
  const open = s.calls.filter(c => c.breaker === "open");
  const down = s.services.filter(x => x.state !== "up");
  let h = `<div class="cards">
    <div class="card"><b>${s.services.length}</b>services</div>
    <div class="card"><b>${s.services.reduce((a, x) => a + x.up, 0)} / ${s.services.reduce((a, x) => a + x.replicas, 0)}</b>sidecars answering</div>
    <div class="card" id="open-breakers"><b>${open.length}</b>breakers open</div>
    <div class="card"><b>${s.findings.length}</b>lint findings</div></div>`;
  if (open.length) {
    h += `<div class="message bad" id="open-list">Open breakers: ${open.map(c =>
      `${esc(c.from)} → ${esc(c.dependency)} ${state("open")}`).join(", ")}</div>`;
  }
  if (down.length) h += `<div class="message bad">Not answering: ${down.map(x => esc(x.name) + " " + state(x.state)).join(", ")}</div>`;
  h += graphSvg(s);
  h += `<h2>Calls</h2><table id="calls"><thead><tr><th>Caller</th><th>Dependency</th><th>Policy</th>
    <th>Req/s</th><th>Errors</th><th>p99</th><th>Breaker</th><th>Refused: breaker open</th><th>Bulkhead full</th><th>Timeouts</th></tr></thead><tbody>`;
  for (const c of s.calls) {
    const repl = c.breakerReplicas > 1 && c.breaker === "open" ? `(${c.breakerOpenReplicas}/${c.breakerReplicas})` : "";
    h += `<tr id="call-${esc(c.from)}-${esc(c.dependency)}" class="${c.breaker === "open" ? "open" : ""}">
      <td>${esc(c.from)}</td><td>${esc(c.dependency)}${c.to !== c.dependency ? " → " + esc(c.to) : ""}</td>
      <td class="muted">${esc(c.policy)}</td><td class="num">${num(c.window.rps)}</td>
      <td class="num">${pct(c.window.errorRate)}</td><td class="num">${ms(c.window.p99Ms)}</td>
      <td class="breaker">${state(c.breaker, repl)}</td><td class="num">${c.circuitOpenRejections}</td>
      <td class="num">${c.bulkheadRejections}</td><td class="num">${c.timeouts}</td></tr>`;
  }
  h += `</tbody></table><h2>Services</h2><table id="services"><thead><tr><th>Service</th><th>State</th><th>Sidecars</th>
    <th>Req/s in</th><th>Errors</th><th>p99</th><th>Rate-limited</th><th>Concurrency-limited</th><th>Findings</th></tr></thead><tbody>`;
  for (const x of s.services) {
    h += `<tr id="svc-${esc(x.name)}"><td>${esc(x.name)}${x.edge ? " (edge)" : ""}</td><td>${state(x.state)}</td>
      <td class="num">${x.up}/${x.replicas}</td><td class="num">${num(x.inbound.rps)}</td>
      <td class="num">${pct(x.inbound.errorRate)}</td><td class="num">${ms(x.inbound.p99Ms)}</td>
      <td class="num">${x.rateLimited}</td><td class="num">${x.concurrencyLimited}</td><td>${findings(x.findings)}</td></tr>`;
  }
  h += `</tbody></table><h2>Lint findings</h2>`;
  h += s.findings.length ? s.findings.map(f =>
    `<div class="finding">${state(f.severity)}<b>${esc(f.rule)}</b>${esc(f.message)} <span class="muted">(${esc(f.objects.join(", "))}) — ${esc(f.hint)}</span></div>`).join("")
    : `<p class="muted">None.</p>`;
  $("#main").innerHTML = h;
}

// ---- Queues -----------------------------------------------------------------------------

function lagText(lag) {
  if (!lag) return "–";
  const k = Object.keys(lag);
  return k.length ? k.map(c => `${esc(c)}: ${lag[c]}`).join("<br>") : "–";
}

function renderQueues(s) {
  let h = `<h2>Queues</h2><table id="queues"><thead><tr><th>Queue</th><th>Event type</th><th>Publishers</th><th>Consumers</th>
    <th>Messages</th><th>Lag (pending per consumer)</th><th>Dead letters</th><th>Starts sagas</th></tr></thead><tbody>`;
  for (const q of s.queues) {
    h += `<tr id="queue-${esc(q.name)}"><td><a href="#/queues/${enc(q.name)}">${esc(q.name)}</a>${findings(q.findings)}</td>
      <td>${esc(q.eventType)}</td><td>${esc(q.publishers.join(", "))}</td><td>${esc(q.consumers.join(", "))}</td>
      <td class="num">${q.error ? state("error") + " " + esc(q.error) : q.messages}</td><td>${lagText(q.lag)}</td>
      <td class="num dead">${q.deadLetters == null ? "–" : q.deadLetters}</td><td>${esc((q.triggers || []).join(", "))}</td></tr>`;
  }
  $("#main").innerHTML = h + `</tbody></table>`;
}

async function loadDeadLetters(name) {
  const r = await api("GET", `/api/queues/${enc(name)}/dead-letters`);
  const v = view["q:" + name];
  v.letters = r.ok ? r.data.deadLetters : [];
  v.error = r.ok ? null : r.data.error;
  v.loadedCount = v.count;
  drawDeadLetters(name);
}

function drawDeadLetters(name) {
  const v = view["q:" + name];
  const box = $("#letters");
  if (!box) return;
  if (v.error) { box.innerHTML = `<div class="message bad">${esc(v.error)}</div>`; return; }
  if (!v.letters) { box.innerHTML = `<p class="muted">Loading…</p>`; return; }
  if (!v.letters.length) { box.innerHTML = `<p class="muted" id="no-dead-letters">No dead letters.</p>`; return; }
  let h = `<table id="dead-letters"><thead><tr><th>Seq</th><th>Event id</th><th>Reason</th><th>Deliveries</th><th>Dead-lettered at</th>
    <th>Consumer</th><th>Last error</th><th></th></tr></thead><tbody>`;
  for (const d of v.letters) {
    h += `<tr data-seq="${esc(d.seq)}"><td>${esc(d.seq)}</td><td>${esc(d.eventId)}</td><td>${esc(d.reason)}</td>
      <td class="num">${esc(d.deliveryCount)}</td><td class="nowrap">${esc(when(d.deadLetteredAt))}</td><td>${esc(d.consumer)}</td>
      <td>${esc(d.lastError)}</td><td><button class="show" data-seq="${esc(d.seq)}">Show</button>
      ${snap.actions ? `<button class="replay" data-seq="${esc(d.seq)}">Replay</button>` : ""}</td></tr>`;
  }
  box.innerHTML = h + `</tbody></table>`;
}

function renderQueue(s, name) {
  const q = s.queues.find(x => x.name === name);
  if (!q) { $("#main").innerHTML = `<p>No queue ${esc(name)}.</p>`; return; }
  const key = "q:" + name;
  const v = view[key] = view[key] || {};
  v.count = q.deadLetters;
  if (route === "queue:" + name && $("#queue-figures")) {
    $("#queue-figures").innerHTML = queueFigures(q);
    if (v.loadedCount !== v.count && !document.querySelector("button.armed")) loadDeadLetters(name);
    return;
  }
  $("#main").innerHTML = `<p><a href="#/queues">← Queues</a></p><h2>Queue ${esc(name)}</h2>
    <div class="cards" id="queue-figures">${queueFigures(q)}</div>
    <h3>Dead letters ${snap.actions ? `<button id="replay-all">Replay all</button>` : `<span class="muted">(read-only: ${enableActions()} to replay)</span>`}
      <button id="refresh">Refresh</button></h3>
    <div id="action-result"></div><div id="letters"></div><pre id="shown" hidden></pre>`;
  drawDeadLetters(name);
  loadDeadLetters(name);
  $("#main").onclick = async ev => {
    const b = ev.target.closest("button");
    if (!b) return;
    if (b.id === "refresh") return loadDeadLetters(name);
    if (b.classList.contains("show")) {
      const r = await api("GET", `/api/queues/${enc(name)}/dead-letters/${enc(b.dataset.seq)}`);
      const pre = $("#shown");
      pre.hidden = false;
      pre.textContent = r.ok ? r.data.text : r.data.error;
      return;
    }
    if (b.classList.contains("replay") || b.id === "replay-all") {
      if (!armed(b, b.id === "replay-all" ? "Replay every dead letter?" : "Confirm replay")) return;
      const body = b.id === "replay-all" ? { all: true } : { seq: [b.dataset.seq] };
      const r = await api("POST", `/api/queues/${enc(name)}/replay`, body);
      const out = $("#action-result");
      if (r.ok) {
        out.innerHTML = `<div class="message" id="replayed">Replayed ${r.data.replayed.length}: ${r.data.replayed.map(x =>
          `dead letter ${esc(x.seq)} (event ${esc(x.eventId)}) as message ${esc(x.newSeq)}`).join("; ")}</div>`;
      } else {
        out.innerHTML = `<div class="message bad">${esc(r.data.error || JSON.stringify(r.data.failed))}</div>`;
      }
      loadDeadLetters(name);
    }
  };
}

function queueFigures(q) {
  return `<div class="card"><b>${q.messages == null ? "?" : q.messages}</b>messages</div>
    <div class="card"><b>${q.deadLetters == null ? "–" : q.deadLetters}</b>dead letters</div>
    <div class="card"><b>${esc(q.consumers.join(", ") || "–")}</b>consumers</div>
    <div class="card">lag<br>${lagText(q.lag)}</div>
    ${q.error ? `<div class="message bad">${esc(q.error)}</div>` : ""}`;
}

// ---- Sagas ------------------------------------------------------------------------------

function renderSagas(s) {
  const v = view.sagas = view.sagas || { filter: "", status: "", version: "" };
  if (route !== "sagas" || !$("#saga-tables")) {
    $("#main").innerHTML = `<h2>Sagas</h2><p><input type="search" id="saga-filter" placeholder="Filter by instance id" value="${esc(v.filter)}">
      <select id="saga-status"><option value="">every state</option>${["Running", "Compensating", "Cancelling", "Completed", "Compensated", "CompensationFailed", "Cancelled"]
        .map(x => `<option${v.status === x ? " selected" : ""}>${x}</option>`).join("")}</select>
      <select id="saga-version"><option value="">every version</option></select></p><div id="saga-tables"></div>`;
    $("#saga-filter").oninput = e => { v.filter = e.target.value; drawSagas(snap); };
    $("#saga-status").onchange = e => { v.status = e.target.value; drawSagas(snap); };
    $("#saga-version").onchange = e => { v.version = e.target.value; drawSagas(snap); };
  }
  drawSagas(s);
}

// The version filter offers the versions the listed instances run (kept when it still exists).
function versionOptions(s) {
  const v = view.sagas, sel = $("#saga-version");
  if (!sel) return;
  const seen = [...new Set(s.sagas.flatMap(g => (g.instances || []).map(i => i.version).filter(x => x != null)))].sort();
  if (v.version && !seen.includes(v.version)) seen.push(v.version);
  const want = ["", ...seen].join(" ");
  if (sel.dataset.options === want) return;
  sel.dataset.options = want;
  sel.innerHTML = `<option value="">every version</option>` +
    seen.map(x => `<option value="${esc(x)}"${v.version === x ? " selected" : ""}>version ${esc(x)}</option>`).join("");
}

// "version abc: 3 instances, 1 unfinished" for each version a saga's instances run.
function versionCounts(g) {
  const by = {};
  for (const i of g.instances || []) {
    const k = i.version == null ? "(before versions)" : i.version;
    const c = by[k] = by[k] || { all: 0, unfinished: 0 };
    c.all++;
    if (["Running", "Compensating", "Cancelling"].includes(i.status)) c.unfinished++;
  }
  const keys = Object.keys(by).sort();
  if (!keys.length) return "";
  return `<p class="versions">By version: ${keys.map(k => `<code>${esc(k)}</code>: ${by[k].all} instance(s), ${by[k].unfinished} unfinished`).join(" · ")}</p>`;
}

function drawSagas(s) {
  const v = view.sagas;
  versionOptions(s);
  let h = "";
  for (const g of s.sagas) {
    const by = g.byStatus || {};
    h += `<h3>Saga ${esc(g.name)}</h3><p class="muted">steps: ${g.steps.map(x => esc(x.name) + " (" + esc(x.target) + ")").join(" → ")}
      · ${g.coordinators} coordinator replica(s)${g.triggerQueue ? " · started by queue " + esc(g.triggerQueue) : ""}</p>`;
    h += findings(g.findings);
    if (g.error) { h += `<div class="message bad">${esc(g.error)}</div>`; continue; }
    h += `<div class="cards">${Object.keys(by).map(k => `<div class="card">${state(k)}<b>${by[k]}</b></div>`).join("") || `<span class="muted">No instances yet.</span>`}</div>`;
    h += versionCounts(g);
    const rows = (g.instances || []).filter(i =>
      (!v.filter || i.id.includes(v.filter)) && (!v.status || i.status === v.status) &&
      (!v.version || i.version === v.version));
    h += `<table class="instances" data-saga="${esc(g.name)}"><thead><tr><th>Instance</th><th>State</th><th>Version</th><th>Step</th><th>Started</th><th>Updated</th><th>Reason</th></tr></thead><tbody>`;
    for (const i of rows.slice(0, 200)) {
      const step = i.step ? (g.steps[i.step - 1] || {}).name || i.step : "–";
      h += `<tr data-id="${esc(i.id)}"><td class="nowrap"><a href="#/sagas/${enc(g.name)}/${enc(i.id)}">${esc(i.id)}</a></td><td>${state(i.status)}</td>
        <td>${esc(i.version == null ? "–" : i.version)}</td><td>${esc(step)}</td><td class="nowrap">${esc(when(i.startedAt || i.started_at))}</td>
        <td class="nowrap">${esc(when(i.updatedAt || i.updated_at))}</td><td>${esc(i.reason || "")}</td></tr>`;
    }
    h += `</tbody></table>`;
    if (rows.length > 200) h += `<p class="muted">${rows.length - 200} more: filter by id.</p>`;
  }
  $("#saga-tables").innerHTML = h || `<p class="muted">No sagas in this system.</p>`;
}

function duration(a, b) {
  const d = new Date(b) - new Date(a);
  return isNaN(d) ? "" : (d >= 1000 ? (d / 1000).toFixed(2) + " s" : d + " ms");
}

async function loadInstance(saga, id) {
  const r = await api("GET", `/api/sagas/${enc(saga)}/${enc(id)}`);
  const v = view["i:" + saga + "/" + id];
  v.data = r.ok ? r.data : null;
  v.error = r.ok ? null : r.data.error;
  drawInstance(saga, id);
}

function drawInstance(saga, id) {
  const v = view["i:" + saga + "/" + id];
  const box = $("#instance");
  if (!box) return;
  if (v.error) { box.innerHTML = `<div class="message bad">${esc(v.error)}</div>`; return; }
  if (!v.data) { box.innerHTML = `<p class="muted">Loading…</p>`; return; }
  const d = v.data;
  // Cancel applies to an instance still running or compensating; retry to a failed compensation.
  const finished = ["Completed", "Compensated", "CompensationFailed", "Cancelled", "Cancelling"].includes(d.status);
  let h = `<p>State: <span id="instance-status">${state(d.status)}</span> ${d.reason ? `<span class="muted">reason: ${esc(d.reason)}</span>` : ""}</p>`;
  if (snap.actions) {
    if (!finished) h += `<button id="cancel">Cancel</button> `;
    if (d.status === "CompensationFailed") h += `<button id="retry">Retry compensation</button>`;
  } else {
    h += `<p class="muted">Read-only: ${enableActions()} to cancel or retry.</p>`;
  }
  h += stepSummary(saga, d);
  h += `<h3>Timeline</h3><ol class="timeline" id="timeline">`;
  let prev = null;
  for (const e of d.entries || []) {
    const bad = /failed/.test(e.type) ? "bad" : "";
    h += `<li class="${bad}"><span class="kind">${esc(e.type)}</span>${e.name ? esc(e.name) + " " : ""}
      <span class="muted">${esc(when(e.at))}${prev ? " (+" + duration(prev, e.at) + ")" : ""} by ${esc(e.by)}</span>
      ${e.error ? `<div class="bad">error: ${esc(e.error)}</div>` : ""}${e.reason ? `<div>reason: ${esc(e.reason)}</div>` : ""}</li>`;
    prev = e.at;
  }
  h += `</ol><h3>Input</h3><pre>${esc(JSON.stringify(d.input, null, 2))}</pre>`;
  box.innerHTML = h;
}

// Per step of the saga: how far it got, attempts, time taken, the last error, compensation.
function stepSummary(saga, d) {
  const g = (snap.sagas || []).find(x => x.name === saga);
  if (!g) return "";
  let h = `<h3>Steps</h3><table id="steps"><thead><tr><th>#</th><th>Step</th><th>Calls</th><th>State</th><th>Attempts</th><th>Took</th><th>Compensation</th><th>Last error</th></tr></thead><tbody>`;
  g.steps.forEach((st, i) => {
    const n = i + 1;
    const es = (d.entries || []).filter(e => e.step === n);
    const started = es.filter(e => e.type === "step-started");
    const end = es.find(e => e.type === "step-succeeded" || e.type === "step-failed");
    let word = "not started";
    if (end) word = end.type === "step-succeeded" ? "succeeded" : "failed";
    else if (started.length) word = "running";
    let comp = g.steps[i].compensated ? "–" : "none";
    const cs = es.find(e => e.type === "comp-succeeded"), cf = es.filter(e => e.type === "comp-failed");
    if (cs) comp = "compensated";
    else if (cf.length) comp = `failed ×${cf.length}`;
    else if (es.some(e => e.type === "comp-started")) comp = "compensating";
    const errs = es.filter(e => e.error);
    const cls = { succeeded: "Completed", failed: "CompensationFailed", running: "Running" }[word] || "none";
    h += `<tr><td>${n}</td><td>${esc(st.name)}</td><td>${esc(st.target)}</td>
      <td><span class="state state-${cls}">${esc(word)}</span></td><td class="num">${started.length}</td>
      <td class="num">${started.length && end ? duration(started[0].at, end.at) : "–"}</td><td>${esc(comp)}</td>
      <td>${errs.length ? esc(errs[errs.length - 1].error) : ""}</td></tr>`;
  });
  return h + `</tbody></table>`;
}

function renderInstance(s, saga, id) {
  const key = "i:" + saga + "/" + id;
  const v = view[key] = view[key] || {};
  if (route === "instance:" + saga + "/" + id && $("#instance")) {
    if (!document.querySelector("button.armed")) loadInstance(saga, id);
    return;
  }
  $("#main").innerHTML = `<p><a href="#/sagas">← Sagas</a></p><h2>Saga ${esc(saga)}: instance ${esc(id)}</h2>
    <div id="action-result"></div><div id="instance"></div>`;
  drawInstance(saga, id);
  loadInstance(saga, id);
  $("#main").onclick = async ev => {
    const b = ev.target.closest("button");
    if (!b || (b.id !== "cancel" && b.id !== "retry")) return;
    if (!armed(b, b.id === "cancel" ? "Confirm cancel (compensates)" : "Confirm retry")) return;
    const r = await api("POST", `/api/sagas/${enc(saga)}/${enc(id)}/${b.id}`, { reason: "from the dashboard" });
    $("#action-result").innerHTML = r.ok
      ? `<div class="message" id="action-ok">${b.id === "cancel" ? "Cancel" : "Retry"} accepted: ${esc(r.data.status || "")}</div>`
      : `<div class="message bad" id="action-error">${esc(r.data.error || ("HTTP " + r.status))}</div>`;
    loadInstance(saga, id);
  };
}

// ---- Routing and the event stream -------------------------------------------------------

function draw() {
  if (!snap || !snap.services) return;
  const h = location.hash.replace(/^#\/?/, "") || "system";
  const parts = h.split("/").map(decodeURIComponent);
  for (const n of ["system", "queues", "sagas"]) {
    const a = $("#nav-" + n);
    if (a) a.classList.toggle("active", parts[0] === n);
  }
  $("#mode").textContent = snap.actions ? "actions enabled" : "read-only";
  let r;
  if (parts[0] === "queues" && parts[1]) { renderQueue(snap, parts[1]); r = "queue:" + parts[1]; }
  else if (parts[0] === "queues") { renderQueues(snap); r = "queues"; }
  else if (parts[0] === "sagas" && parts[2]) { renderInstance(snap, parts[1], parts[2]); r = "instance:" + parts[1] + "/" + parts[2]; }
  else if (parts[0] === "sagas") { renderSagas(snap); r = "sagas"; }
  else { renderSystem(snap); r = "system"; }
  route = r;
}

function connect() {
  const es = new EventSource("/api/events");
  es.onmessage = ev => {
    snap = JSON.parse(ev.data);
    $("#status").textContent = snap.listError
      ? "stale: " + snap.listError
      : "live · " + (snap.at || "") + (snap.source === "cluster" ? " · cluster" + (snap.namespace ? " " + snap.namespace : "") : "");
    draw();
  };
  es.onerror = () => { $("#status").textContent = "disconnected, retrying…"; };
}

window.addEventListener("hashchange", () => { route = ""; $("#main").onclick = null; draw(); });
connect();
