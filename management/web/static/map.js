// The lining map of a run: the developed view of the lining, chainage (m) along x and the arc
// round the ring (m) up y, in Leaflet's non-geographic CRS.Simple (1 unit = 1 m, zoom z = 2^z px
// a metre). Each pan or zoom asks the API for the cracks in the viewport; where there are more
// than it draws, it answers with their density in cells, drawn as shaded boxes. The view and the
// filters live in the address, so a view can be shared.
"use strict";
(async function () {
  const runId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const enc = encodeURIComponent(runId);
  const form = document.querySelector("#filters");
  const status = document.querySelector("#status");
  const params = new URLSearchParams(location.search);
  const FILTERS = ["severity", "type", "min_width_mm", "min_length_mm", "verdict"];
  let run;
  try { run = await crackscan.api(`/api/runs/${enc}`); } catch (error) { crackscan.fail("#status", error); return; }
  document.title = `crackscan: lining map of ${runId}`;
  document.querySelector("#title").innerHTML = `run ${crackscan.esc(runId)}` + (run.tunnel ? ` · ${crackscan.esc(run.tunnel)}` : "")
    + ` · ${crackscan.date(run.started_at)} · ${crackscan.esc(run.status)} · ${run.frames} frames · `
    + crackscan.severityBadges(run.physical_by_severity, run.severity_classes);
  const colours = Object.fromEntries(run.severity_classes.map(c => [c.name, c.colour]));
  for (const c of run.severity_classes) form.severity.add(new Option(`${c.name} (${c.range})`, c.name));
  for (const t of run.crack_types) form.type.add(new Option(t, t));
  for (const name of FILTERS) if (params.has(name)) form[name].value = params.get(name);

  const map = L.map("map", {crs: L.CRS.Simple, minZoom: -9, maxZoom: 14, zoomSnap: 0.25,
                             zoomDelta: 0.5, preferCanvas: true, attributionControl: false});
  const cracks = L.layerGroup().addTo(map);
  const density = L.layerGroup().addTo(map);
  const features = L.layerGroup().addTo(map);
  L.control.layers(null, {"cracks": cracks, "crack density": density, "lining features": features},
                   {collapsed: false}).addTo(map);
  const legend = L.control({position: "bottomright"});
  legend.onAdd = () => {
    const div = L.DomUtil.create("div", "legend");
    div.innerHTML = run.severity_classes.map(c =>
      `<div><i style="background:${c.colour}"></i>${crackscan.esc(c.name)} ${crackscan.esc(c.range)}</div>`).join("")
      + '<div><i style="background:#9e9e9e"></i>rejected</div><div><i style="background:#8050b0"></i>lining feature</div>';
    return div;
  };
  legend.addTo(map);

  const ext = run.extent;
  const bounds = L.latLngBounds([ext.arc_mm[0] / 1000, ext.chainage_m[0]], [ext.arc_mm[1] / 1000, ext.chainage_m[1]]);
  if (params.has("c") && params.has("a") && params.has("z")) {
    map.setView([Number(params.get("a")) / 1000, Number(params.get("c"))], Number(params.get("z")));
  } else {
    map.fitBounds(bounds.pad(0.05));
  }

  function filterQuery() {
    const q = new URLSearchParams();
    for (const name of FILTERS) if (form[name].value !== "") q.set(name, form[name].value);
    return q;
  }
  function updateLinks(view) {
    const q = filterQuery();
    document.querySelector("#csv").href = `/api/runs/${enc}/export?format=csv&${q}`;
    document.querySelector("#geojson").href = `/api/runs/${enc}/export?format=geojson&${q}`;
    document.querySelector("#report").href = `/api/runs/${enc}/report`;
    const state = new URLSearchParams(q);
    state.set("c", view.c.toFixed(3)); state.set("a", view.a.toFixed(1)); state.set("z", view.z);
    history.replaceState(null, "", `${location.pathname}?${state}`);
  }
  function crackPopup(c) {
    return `<b>crack ${c.number}</b> ${crackscan.verdictBadge(c.verdict, c.verdict_reason)}<br>
      chainage ${crackscan.num(c.chainage_m, 2)} m, arc ${crackscan.num(c.arc_mm, 0)} mm<br>
      length ${crackscan.num(c.length_mm, 0)} mm, max width ${crackscan.num(c.width_max_mm, 2)} mm
      (${crackscan.esc(c.severity)}), ${crackscan.esc(c.type)}<br>
      <a href="/runs/${enc}/cracks/${c.number}">open crack ${c.number}</a>`;
  }

  let asked = 0;
  async function refresh() {
    const ticket = ++asked;
    const b = map.getBounds(), size = map.getSize();
    const chainage = [b.getWest(), b.getEast()], arc = [b.getSouth() * 1000, b.getNorth() * 1000];
    const view = {c: (chainage[0] + chainage[1]) / 2, a: (arc[0] + arc[1]) / 2, z: map.getZoom()};
    updateLinks(view);
    const q = filterQuery();
    q.set("chainage", `${chainage[0].toFixed(3)}:${chainage[1].toFixed(3)}`);
    q.set("arc", `${arc[0].toFixed(1)}:${arc[1].toFixed(1)}`);
    q.set("cells_along", Math.max(1, Math.min(2000, Math.round(size.x / 12))));
    q.set("cells_across", Math.max(1, Math.min(500, Math.round(size.y / 12))));
    try {
      const found = await crackscan.api(`/api/runs/${enc}/cracks?${q}`);
      let shown = [];
      if (chainage[1] - chainage[0] < 600) {
        const f = new URLSearchParams({chainage: q.get("chainage")});
        shown = await crackscan.api(`/api/runs/${enc}/features?${f}`);
      }
      if (ticket !== asked) return;  // a newer view was asked for meanwhile
      cracks.clearLayers(); density.clearLayers(); features.clearLayers();
      const weight = Math.max(1.5, Math.min(6, Math.pow(2, map.getZoom()) / 400));
      if (found.cracks) {
        for (const c of found.cracks) {
          const rejected = c.verdict === "rejected";
          L.polyline(c.polyline.map(p => [p[1] / 1000, p[0]]),
                     {color: rejected ? "#9e9e9e" : (colours[c.severity] || "#c0001a"), weight: weight,
                      dashArray: rejected ? "4 4" : null, className: "crack"})
            .bindPopup(crackPopup(c)).addTo(cracks);
        }
      } else {
        const d = found.density, top = Math.max(...d.cells.map(cell => cell[2]), 1);
        for (const [i, j, n, widest] of d.cells) {
          const x0 = chainage[0] + i * d.cell_m, y0 = (arc[0] + j * d.cell_mm) / 1000;
          L.rectangle([[y0, x0], [y0 + d.cell_mm / 1000, x0 + d.cell_m]],
                      {stroke: false, fillColor: "#d84315", fillOpacity: 0.15 + 0.75 * Math.log1p(n) / Math.log1p(top)})
            .bindTooltip(`${n} cracks, widest ${crackscan.num(widest, 2)} mm`).addTo(density);
        }
      }
      for (const f of shown) {
        L.rectangle([[f.arc_start_mm / 1000, f.chainage_start_m], [f.arc_end_mm / 1000, f.chainage_end_m]],
                    {color: "#8050b0", weight: 1, fillOpacity: 0.08})
          .bindTooltip(`${crackscan.esc(f.kind)}, ${crackscan.num(f.length_mm, 0)} mm`).addTo(features);
      }
      status.textContent = `chainage ${chainage[0].toFixed(1)} – ${chainage[1].toFixed(1)} m, arc ${arc[0].toFixed(0)} – ${arc[1].toFixed(0)} mm · `
        + (found.cracks ? `${found.cracks.length} cracks drawn` : `${found.total} cracks, shown as density (zoom in to draw them)`)
        + (shown.length ? ` · ${shown.length} lining features` : "");
      status.dataset.ready = String(ticket);
    } catch (error) {
      if (ticket === asked) { status.innerHTML = `<span class="error">${crackscan.esc(error.message)}</span>`; }
    }
  }
  map.on("moveend", refresh);
  map.on("mousemove", e => { status.title = `chainage ${e.latlng.lng.toFixed(3)} m, arc ${(e.latlng.lat * 1000).toFixed(0)} mm`; });
  form.addEventListener("change", refresh);
  form.addEventListener("submit", e => e.preventDefault());
  document.querySelector("#go").addEventListener("click", () => {
    const a = Number(form.from.value), b = Number(form.to.value);
    if (Number.isFinite(a) && Number.isFinite(b) && b > a) {
      map.fitBounds(L.latLngBounds([ext.arc_mm[0] / 1000, a], [ext.arc_mm[1] / 1000, b]));
    }
  });
  window.crackscanMap = map;  // for the browser tests and the console
  refresh();
})();
