// Two inspections compared as `crackscan compare` does: new, grown, gone and unchanged cracks on a
// map of the lining (the earlier run's chainage) and as a table.
"use strict";
(async function () {
  const form = document.querySelector("#choose");
  const params = new URLSearchParams(location.search);
  const COLOUR = {new: "#c62828", grown: "#ef6c00", unchanged: "#78909c", gone: "#1565c0"};
  let runs;
  try { runs = await crackscan.api("/api/runs"); } catch (error) { crackscan.fail("#changes", error); return; }
  for (const run of runs) {
    const label = `${run.id}${run.tunnel ? " · " + run.tunnel : ""} · ${crackscan.date(run.started_at)}`;
    form.before.add(new Option(label, run.id)); form.after.add(new Option(label, run.id));
  }
  if (params.has("before")) form.before.value = params.get("before");
  if (params.has("after")) form.after.value = params.get("after");
  if (params.has("tolerance_mm")) form.tolerance_mm.value = params.get("tolerance_mm");
  const map = L.map("cmpmap", {crs: L.CRS.Simple, minZoom: -9, maxZoom: 14, zoomSnap: 0.25, attributionControl: false});
  const layer = L.layerGroup().addTo(map);
  map.setView([0, 0], 0);

  async function compare() {
    const q = new URLSearchParams({before: form.before.value, after: form.after.value, tolerance_mm: form.tolerance_mm.value});
    history.replaceState(null, "", `/compare?${q}`);
    const summary = document.querySelector("#summary");
    summary.textContent = "comparing…";
    let report;
    try { report = await crackscan.api(`/api/compare?${q}`); }
    catch (error) { summary.innerHTML = `<span class="error">${crackscan.esc(error.message)}</span>`; return; }
    const s = report.summary, a = report.alignment;
    summary.textContent = `${s.before} before, ${s.after} after: ${s.matched} matched (${s.grown} grown, ${s.unchanged} unchanged), ${s.new} new, ${s.gone} gone · `
      + (a.method === "joints" ? `aligned on ${a.joints_matched} ring joints (scale ${a.scale})` : `offset ${a.offset_m} m`);
    const items = [
      ...report.matched.map(m => ({change: m.grown ? "grown" : "unchanged", chainage_m: m.chainage_m, arc_mm: m.arc_mm,
        before: m.before, after: m.after, length: `${crackscan.num(m.length_before_mm, 0)} → ${crackscan.num(m.length_after_mm, 0)}`,
        width: `${crackscan.num(m.width_before_mm, 2)} → ${crackscan.num(m.width_after_mm, 2)}`})),
      ...report.new.map(c => ({change: "new", chainage_m: c.chainage_m, arc_mm: c.arc_mm, before: [], after: [c.number],
        length: crackscan.num(c.length_mm, 0), width: crackscan.num(c.width_max_mm, 2)})),
      ...report.gone.map(c => ({change: "gone", chainage_m: c.chainage_m, arc_mm: c.arc_mm, before: [c.number], after: [],
        length: crackscan.num(c.length_mm, 0), width: crackscan.num(c.width_max_mm, 2)})),
    ].sort((x, y) => x.chainage_m - y.chainage_m);
    layer.clearLayers();
    const links = (run, numbers) => numbers.map(n => `<a href="/runs/${encodeURIComponent(run)}/cracks/${n}">${n}</a>`).join(", ") || "–";
    for (const it of items) {
      L.circleMarker([it.arc_mm / 1000, it.chainage_m], {radius: 5, color: COLOUR[it.change], fillOpacity: 0.8})
        .bindTooltip(`${it.change}: ${it.length} mm long`).addTo(layer);
    }
    if (items.length) {
      map.fitBounds(L.latLngBounds(items.map(it => [it.arc_mm / 1000, it.chainage_m])).pad(0.1));
    }
    document.querySelector("#changes").innerHTML = `<table id="changes-table"><tr><th class="text">change</th><th>chainage (m)</th><th>arc (mm)</th>
      <th class="text">before</th><th class="text">after</th><th>length (mm)</th><th>max width (mm)</th></tr>${items.map(it =>
      `<tr><td class="text"><span class="badge" style="background:${COLOUR[it.change]}">${it.change}</span></td>
      <td>${crackscan.num(it.chainage_m, 2)}</td><td>${crackscan.num(it.arc_mm, 0)}</td>
      <td class="text">${links(report.before_run, it.before)}</td><td class="text">${links(report.after_run, it.after)}</td>
      <td>${it.length}</td><td>${it.width}</td></tr>`).join("")}</table>`;
  }
  form.addEventListener("submit", e => { e.preventDefault(); compare(); });
  if (params.has("before") && params.has("after")) compare();
})();
