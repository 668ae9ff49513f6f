"""The dashboard at `/`: one static page that renders the JSON API. It leads with one card per model
(production and previous version, who promoted it and why, its last jobs with their gate verdicts, and
accuracy and p95 latency across versions drawn against the gate thresholds), then the event tables."""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlgate</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:2rem;color:#1f2328}
 h1{font-size:1.3rem} h2{font-size:1.05rem;margin-top:2rem}
 table{border-collapse:collapse;width:100%} th,td{padding:.3rem .6rem;border-bottom:1px solid #d0d7de;text-align:left}
 th{background:#f6f8fa} code{font-size:12px}
 .state{padding:.1rem .45rem;border-radius:1rem;font-size:12px;background:#eaeef2}
 .succeeded{background:#dafbe1}.gate_failed,.failed{background:#ffebe9}.running{background:#ddf4ff}
 .queued{background:#fff8c5}.superseded,.cancelled{background:#eaeef2;color:#57606a}
 #status{color:#57606a}
 .cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:1rem}
 .card{border:1px solid #d0d7de;border-radius:.5rem;padding:1rem}
 .card h3{margin:0 0 .3rem;font-size:1.05rem} .card .who{color:#57606a;margin:.2rem 0 .6rem}
 .charts{display:flex;gap:1rem;margin-top:.6rem} .charts figure{margin:0} figcaption{font-size:12px;color:#57606a}
 svg .threshold{stroke:#cf222e;stroke-dasharray:4 3} svg .series{fill:none;stroke:#0969da;stroke-width:2}
 svg .failed-point{fill:#cf222e} svg .point{fill:#0969da}
</style></head>
<body>
<h1>mlgate</h1>
<p id="status">loading…</p>
<h2>Models</h2>
<div id="models" class="cards"></div>
<h2>Jobs</h2>
<table id="jobs"><thead><tr><th>job</th><th>model</th><th>kind</th><th>trigger</th><th>commit / PR</th>
<th>state</th><th>progress</th><th>attempts</th><th>created</th><th>version</th><th>report</th></tr></thead>
<tbody></tbody></table>
<h2>Webhook deliveries</h2>
<table id="deliveries"><thead><tr><th>delivery</th><th>event</th><th>status</th><th>reason</th><th>jobs</th></tr></thead>
<tbody></tbody></table>
<h2>Drift events</h2>
<table id="drift"><thead><tr><th>event</th><th>model</th><th>drift share</th><th>outcome</th><th>job</th><th>reason</th></tr>
</thead><tbody></tbody></table>
<script>
function cell(row, value, cls) {
  const td = row.insertCell(); td.textContent = value == null ? "" : String(value);
  if (cls) td.className = cls; return td;
}
function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody"); body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
}
const SVG = "http://www.w3.org/2000/svg";
function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}
// one metric across versions, with the gate's threshold as a dashed line
function chart(metric, label, versions, threshold) {
  const fig = document.createElement("figure"), w = 250, h = 120, pad = 22;
  const values = versions.map(v => v[metric]).filter(v => v != null);
  const all = threshold == null ? values : values.concat([threshold]);
  const lo = Math.min(...all), hi = Math.max(...all), span = (hi - lo) || Math.abs(hi) || 1;
  const x = i => pad + (versions.length < 2 ? (w - 2 * pad) / 2 : i * (w - 2 * pad) / (versions.length - 1));
  const y = v => h - pad - (v - lo) / span * (h - 2 * pad);
  const svg = svgEl("svg", {width: w, height: h, "data-metric": metric, role: "img"});
  svg.append(svgEl("line", {x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, stroke: "#d0d7de"}));
  if (threshold != null) {
    const t = svgEl("line", {x1: pad, x2: w - pad, y1: y(threshold), y2: y(threshold), class: "threshold",
                             "data-threshold": threshold});
    svg.append(t);
  }
  const points = versions.map((v, i) => v[metric] == null ? null : [x(i), y(v[metric])]).filter(Boolean);
  svg.append(svgEl("polyline", {points: points.map(p => p.join(",")).join(" "), class: "series"}));
  versions.forEach((v, i) => {
    if (v[metric] == null) return;
    const dot = svgEl("circle", {cx: x(i), cy: y(v[metric]), r: 4, class: v.gate_passed ? "point" : "failed-point"});
    const tip = svgEl("title", {}); tip.textContent = "v" + v.version + ": " + v[metric]; dot.append(tip);
    svg.append(dot);
    const tick = svgEl("text", {x: x(i), y: h - 6, "font-size": 10, "text-anchor": "middle"});
    tick.textContent = "v" + v.version; svg.append(tick);
    const value = svgEl("text", {x: x(i), y: y(v[metric]) - 7, "font-size": 10, "text-anchor": "middle"});
    value.textContent = Number(v[metric]).toPrecision(3); svg.append(value);
  });
  const cap = document.createElement("figcaption");
  cap.textContent = label + (threshold == null ? "" : " (gate: " + threshold + ")");
  fig.append(svg, cap); return fig;
}
function modelCard(m) {
  const card = document.createElement("section"); card.className = "card"; card.dataset.model = m.model;
  const title = document.createElement("h3");
  title.textContent = m.model + ": " + (m.production ? "production v" + m.production : "nothing in production") +
    (m.previous ? " (previous v" + m.previous + ")" : "");
  const who = document.createElement("p"); who.className = "who";
  const p = m.promoted;
  const did = {promote: "promoted", manual_promote: "promoted by hand", rollback: "rolled back"};
  who.textContent = p ? (did[p.action] || p.action) + " by " + p.actor + " at " + p.created_at.replace("T", " ").slice(0, 19) +
    (p.job_id ? " (job " + p.job_id + ")" : "") + ": " + p.reason : "never promoted";
  const table = document.createElement("table"); table.className = "model-jobs";
  const head = table.createTHead().insertRow();
  for (const h of ["job", "trigger", "state", "gate", "version", "cost", "report"]) cell(head, h);
  const body = table.createTBody();
  for (const j of m.jobs) {
    const row = body.insertRow(); row.dataset.job = j.id;
    cell(row, j.id); cell(row, j.trigger + (j.pr ? " #" + j.pr : ""));
    const s = cell(row, ""); const badge = document.createElement("span");
    badge.className = "state " + j.state; badge.textContent = j.state; s.append(badge);
    cell(row, j.gate ? (j.gate.passed ? "passed" : "failed: " + j.gate.failed.join(", ")) : (j.error || ""));
    cell(row, j.version);
    cell(row, costText(j.cost), "cost");
    const r = cell(row, "");
    if (j.report) { const a = document.createElement("a"); a.href = "/reports/" + j.id; a.textContent = "report";
      r.append(a); }
  }
  const charts = document.createElement("div"); charts.className = "charts";
  if (m.versions.length) {
    charts.append(chart("accuracy", "accuracy", m.versions, m.thresholds.min_accuracy),
                  chart("p95_ms", "p95 ms at batch 1", m.versions, m.thresholds.max_p95_latency_ms));
  } else {
    charts.textContent = "no registered version yet";
  }
  const roll = document.createElement("p"); roll.className = "rollout";
  const r = m.rollout;
  if (r) {
    roll.dataset.state = r.state;
    roll.textContent = r.state === "running"
      ? "rollout of v" + r.candidate + " over v" + r.baseline + ": stage " + (r.stage + 1) + ", " + r.requests +
        " requests" + (r.agreement == null ? "" : ", agreement " + r.agreement.toFixed(3)) + liveText(r.live)
      : "last rollout: v" + r.candidate + " " + r.state.replace("_", " ") + (r.reason ? " (" + r.reason + ")" : "");
  }
  const git = document.createElement("p"); git.className = "gitops";
  if (m.gitops) {
    const stages = m.gitops.stages.map(s => s.stage + ": v" + s.declared + " (" + s.outcome.replace("_", " ") +
      (s.detail ? ", " + s.detail : "") + ")");
    git.textContent = "git (" + m.gitops.mode + ", " + (m.gitops.head || "").slice(0, 7) + "): " +
      (stages.join("; ") || "nothing declared") + m.gitops.refused.map(r => "; refused: " + r).join("");
    git.dataset.drift = m.gitops.stages.some(s => s.outcome.startsWith("drift"));
  }
  card.append(title, who, roll, git, table, charts); return card;
}
function costText(c) {
  if (!c || c.wall_seconds == null) return "";
  return Math.round(c.wall_seconds) + " s" + (c.gpu_seconds == null ? " (CPU " + Math.round(c.cpu_seconds) + " s)" :
    ", GPU " + Math.round(c.gpu_seconds) + " s" + (c.gpu_energy_joules == null ? "" :
    ", " + (c.gpu_energy_joules / 1000).toFixed(1) + " kJ"));
}
// a running job's stage, epoch k/N as a bar, its validation accuracy and the time left at the last epoch's pace
function progressCell(row, p) {
  const td = cell(row, "");
  if (!p) return;
  td.className = "progress"; td.dataset.stage = p.stage || "";
  if (p.stage === "train" && p.epochs) {
    const bar = document.createElement("progress"); bar.max = p.epochs; bar.value = p.epoch || 0;
    td.append(bar);
  }
  const text = document.createElement("span");
  text.textContent = (p.stage || "") + (p.epochs ? " " + (p.epoch || 0) + "/" + p.epochs : "") +
    (p.val_accuracy == null ? "" : ", val acc " + Number(p.val_accuracy).toFixed(3)) +
    (p.eta_seconds == null || p.stage !== "train" ? "" : ", ETA " + Math.round(p.eta_seconds) + " s");
  td.append(" ", text);
}
function liveText(live) {
  if (!live) return "";
  const l = live.latency || {}, a = live.accuracy;
  return (l.base_p95_ms == null || l.cand_p95_ms == null ? "" :
      ", p95 " + l.cand_p95_ms.toFixed(2) + " ms vs " + l.base_p95_ms.toFixed(2) + " ms") +
    (a ? ", accuracy " + a.candidate.toFixed(3) + " vs " + a.baseline.toFixed(3) + " on " + live.labelled + " labels" : "");
}
async function refresh() {
  try {
    const [models, jobs, deliveries, drift] = await Promise.all(
      ["/models", "/jobs?limit=100", "/deliveries?limit=30", "/drift-events?limit=30"].map(
        u => fetch(u).then(r => r.json())));
    document.getElementById("models").replaceChildren(...models.map(modelCard));
    fill("jobs", jobs, (row, j) => {
      row.dataset.job = j.id;
      cell(row, j.id); cell(row, j.model); cell(row, j.kind); cell(row, j.trigger);
      cell(row, j.pr ? "#" + j.pr + " " + (j.sha || "").slice(0, 7) : (j.sha || "").slice(0, 7));
      const s = cell(row, ""); const badge = document.createElement("span");
      badge.className = "state " + j.state; badge.textContent = j.state; s.append(badge);
      if (j.error) s.title = j.error;
      progressCell(row, j.progress);
      cell(row, j.attempts); cell(row, (j.created_at || "").replace("T", " ").slice(0, 19)); cell(row, j.version);
      const r = cell(row, "");
      if (j.report_path) { const a = document.createElement("a"); a.href = "/reports/" + j.id;
        a.textContent = "report"; r.append(a); }
    });
    fill("deliveries", deliveries, (row, d) => {
      cell(row, d.delivery); cell(row, d.event + (d.action ? "." + d.action : "")); cell(row, d.status);
      cell(row, d.reason); cell(row, d.jobs.join(", "));
    });
    fill("drift", drift, (row, e) => {
      cell(row, e.id); cell(row, e.model); cell(row, e.drift_share.toFixed(2)); cell(row, e.outcome);
      cell(row, e.job_id); cell(row, e.reason);
    });
    const queued = jobs.filter(j => j.state === "queued").length, running = jobs.filter(j => j.state === "running").length;
    document.getElementById("status").textContent =
      jobs.length + " recent jobs: " + running + " running, " + queued + " queued. Updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "cannot reach the API: " + err;
  }
}
refresh(); setInterval(refresh, 5000);
</script>
</body></html>
"""
