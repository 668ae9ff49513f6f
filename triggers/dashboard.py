"""The dashboard at `/`: one static page that renders the JSON API (jobs, deliveries, drift events)."""

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
</style></head>
<body>
<h1>mlgate</h1>
<p id="status">loading…</p>
<h2>Jobs</h2>
<table id="jobs"><thead><tr><th>job</th><th>model</th><th>kind</th><th>trigger</th><th>commit / PR</th>
<th>state</th><th>attempts</th><th>created</th><th>version</th><th>report</th></tr></thead><tbody></tbody></table>
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
async function refresh() {
  try {
    const [jobs, deliveries, drift] = await Promise.all(
      ["/jobs?limit=100", "/deliveries?limit=30", "/drift-events?limit=30"].map(u => fetch(u).then(r => r.json())));
    fill("jobs", jobs, (row, j) => {
      row.dataset.job = j.id;
      cell(row, j.id); cell(row, j.model); cell(row, j.kind); cell(row, j.trigger);
      cell(row, j.pr ? "#" + j.pr + " " + (j.sha || "").slice(0, 7) : (j.sha || "").slice(0, 7));
      const s = cell(row, ""); const badge = document.createElement("span");
      badge.className = "state " + j.state; badge.textContent = j.state; s.append(badge);
      if (j.error) s.title = j.error;
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
