// Tunnels and their inspections: each run with its coverage, frames, status and cracks by severity.
"use strict";
(async function () {
  const box = document.querySelector("#tunnels");
  try {
    const tunnels = await crackscan.api("/api/tunnels");
    if (!tunnels.length) { box.innerHTML = '<p class="muted">No runs in this database yet.</p>'; return; }
    box.innerHTML = tunnels.map(t => {
      const rows = t.runs.map((run, i) => {
        const covered = run.chainage_start_m === null ? null : run.chainage_end_m - run.chainage_start_m;
        const previous = i > 0 ? t.runs[i - 1].id : null;
        const id = encodeURIComponent(run.id);
        return `<tr data-run="${crackscan.esc(run.id)}">
          <td class="text"><a href="/runs/${id}">${crackscan.esc(run.id)}</a></td>
          <td class="text">${crackscan.date(run.started_at)}</td>
          <td class="text">${crackscan.esc(run.vehicle || "–")}</td>
          <td>${crackscan.num(covered, 1)}</td><td>${run.frames}</td>
          <td class="text">${crackscan.esc(run.status)}</td>
          <td>${Object.values(run.physical_by_severity).reduce((a, b) => a + b, 0)}</td>
          <td class="text">${crackscan.severityBadges(run.physical_by_severity, run.severity_classes)}</td>
          <td class="text"><a href="/runs/${id}">map</a> · <a href="/api/runs/${id}/report">report</a>
          ${previous ? ` · <a href="/compare?before=${encodeURIComponent(previous)}&after=${id}">compare with previous</a>` : ""}</td></tr>`;
      }).join("");
      return `<h2>${t.tunnel === null ? '<span class="muted">Runs without a tunnel</span>' : crackscan.esc(t.tunnel)}</h2>
        <table><thead><tr><th class="text">run</th><th class="text">started (UTC)</th><th class="text">vehicle</th>
        <th>covered (m)</th><th>frames</th><th class="text">status</th><th>physical cracks</th>
        <th class="text">by severity (rejected left out)</th><th class="text"></th></tr></thead><tbody>${rows}</tbody></table>`;
    }).join("");
  } catch (error) { crackscan.fail("#tunnels", error); }
})();
