// One physical crack: measurements, verdict and review form, a mini map of its polyline, the
// photo of every detection with its mask drawn over it, and its history across inspections.
"use strict";
(async function () {
  const parts = location.pathname.split("/");
  const runId = decodeURIComponent(parts[2]), number = Number(parts[4]);
  const enc = encodeURIComponent(runId);
  document.querySelector("#maplink").href = `/runs/${enc}`;
  const form = document.querySelector("#review");
  form.reviewer.value = localStorage.getItem("crackscan.reviewer") || "";
  form.addEventListener("change", () => {
    document.querySelector("#reason-row").hidden = form.verdict.value !== "rejected";
  });

  function miniMap(c) {  // where it is: the crack and its neighbours, 1:1, with the chainage
    const box = document.querySelector("#minimap");
    const map = L.map(box, {crs: L.CRS.Simple, minZoom: -9, maxZoom: 14, zoomSnap: 0.25,
                            attributionControl: false, preferCanvas: true});
    const pad = Math.max(0.5, (c.chainage_end_m - c.chainage_start_m) * 0.5);
    const bounds = L.latLngBounds([(c.arc_start_mm - pad * 1000) / 1000, c.chainage_start_m - pad],
                                  [(c.arc_end_mm + pad * 1000) / 1000, c.chainage_end_m + pad]);
    map.fitBounds(bounds);
    const q = new URLSearchParams({chainage: `${c.chainage_start_m - 3 * pad}:${c.chainage_end_m + 3 * pad}`,
                                   arc: `${c.arc_start_mm - 3000 * pad}:${c.arc_end_mm + 3000 * pad}`, verdict: "any"});
    crackscan.api(`/api/runs/${enc}/cracks?${q}`).then(found => {
      for (const other of found.cracks || []) {
        if (other.number === c.number) continue;
        L.polyline(other.polyline.map(p => [p[1] / 1000, p[0]]), {color: "#90a4ae", weight: 2})
          .bindTooltip(`crack ${other.number}`).on("click", () => { location.href = `/runs/${enc}/cracks/${other.number}`; })
          .addTo(map);
      }
      L.polyline(c.polyline.map(p => [p[1] / 1000, p[0]]), {color: "#c0001a", weight: 4}).addTo(map);
    }).catch(() => {});
    const where = L.control({position: "bottomleft"});
    where.onAdd = () => { const d = L.DomUtil.create("div", "legend");
      d.textContent = `chainage ${crackscan.num(c.chainage_m, 2)} m · arc ${crackscan.num(c.arc_mm, 0)} mm`; return d; };
    where.addTo(map);
  }
  function chart(history, key, label) {  // a measurement over the inspections
    const items = history.filter(h => h[key] !== null);
    if (items.length < 2) return "";
    const W = 260, H = 90, vals = items.map(h => h[key]);
    const lo = Math.min(...vals, 0), hi = Math.max(...vals) * 1.1 || 1;
    const pts = items.map((h, i) => [20 + i * (W - 40) / (items.length - 1), H - 15 - (h[key] - lo) / (hi - lo) * (H - 30)]);
    return `<svg width="${W}" height="${H}" style="background:#fff;border:1px solid #e3e6ea">
      <polyline points="${pts.map(p => p.join(",")).join(" ")}" fill="none" stroke="#1565c0" stroke-width="2"/>
      ${pts.map((p, i) => `<circle cx="${p[0]}" cy="${p[1]}" r="3" fill="#1565c0"><title>${crackscan.esc(items[i].run)}: ${crackscan.num(vals[i], 2)}</title></circle>`).join("")}
      <text x="4" y="12">${label}</text></svg>`;
  }
  async function load() {
    let c;
    try { c = await crackscan.api(`/api/runs/${enc}/cracks/${number}`); }
    catch (error) { crackscan.fail("#crack", error); return; }
    document.title = `crackscan: crack ${number} of ${runId}`;
    document.querySelector("#title").innerHTML = `Crack ${number} of run ${crackscan.esc(runId)} ${crackscan.verdictBadge(c.verdict, c.verdict_reason)}`;
    const rows = [["chainage", `${crackscan.num(c.chainage_start_m, 2)} – ${crackscan.num(c.chainage_end_m, 2)} m`],
      ["arc round the ring", `${crackscan.num(c.arc_start_mm, 0)} – ${crackscan.num(c.arc_end_mm, 0)} mm`],
      ["length", `${crackscan.num(c.length_mm, 1)} mm`], ["maximum width", `${crackscan.num(c.width_max_mm, 2)} mm`],
      ["mean width", `${crackscan.num(c.width_mean_mm, 2)} mm`], ["severity", crackscan.esc(c.severity)],
      ["type", crackscan.esc(c.type)], ["orientation", `${crackscan.num(c.orientation_deg, 0)}°`],
      ["detections", `${c.detections} in ${c.frames} frames (${crackscan.esc(c.cameras.join(", "))})`]];
    document.querySelector("#crack").innerHTML =
      `<table id="measurements">${rows.map(r => `<tr><th class="text">${r[0]}</th><td class="text">${r[1]}</td></tr>`).join("")}</table>
       <div id="minimap" style="width:360px;height:260px;border:1px solid #e3e6ea;background:#fafafa"></div>`;
    miniMap(c);
    document.querySelector("#reviews").innerHTML = c.reviews.length ?
      `<table><tr><th class="text">when (UTC)</th><th class="text">who</th><th class="text">verdict</th><th class="text">note</th></tr>${
        c.reviews.slice().reverse().map(r => `<tr><td class="text">${crackscan.date(r.reviewed_at)}</td><td class="text">${crackscan.esc(r.reviewer)}</td>
        <td class="text">${crackscan.verdictBadge(r.verdict, r.reason)}</td><td class="text">${crackscan.esc(r.note)}</td></tr>`).join("")}</table>`
      : '<p class="muted">Not reviewed yet.</p>';
    document.querySelector("#evidence").innerHTML = c.detection_records.map(d => {
      const key = `${encodeURIComponent(d.camera)}/${d.seq}/${d.index}`;
      const photo = d.photo ? `<img class="photo" src="/api/runs/${enc}/detections/${key}/photo" alt="photo of detection ${d.index} in frame ${d.seq}">`
        : '<div class="nophoto">no photo</div>';
      return `<figure>${photo}<img class="mask" src="/api/runs/${enc}/detections/${key}/mask" alt="mask">
        <figcaption>${crackscan.esc(d.camera)} frame ${d.seq} · ${crackscan.num(d.chainage_m, 2)} m · ${crackscan.num(d.width_max_mm, 2)} mm</figcaption></figure>`;
    }).join("");
    document.querySelector("#history").innerHTML =
      `<table><tr><th class="text">run</th><th class="text">started (UTC)</th><th class="text">change</th><th class="text">cracks</th><th>length (mm)</th><th>max width (mm)</th></tr>${
        c.history.map(h => `<tr><td class="text">${crackscan.esc(h.run)}</td><td class="text">${crackscan.date(h.started_at)}</td>
          <td class="text">${crackscan.esc(h.change)}</td>
          <td class="text">${h.cracks.map(n => `<a href="/runs/${encodeURIComponent(h.run)}/cracks/${n}">${n}</a>`).join(", ") || "–"}</td>
          <td>${crackscan.num(h.length_mm, 1)}</td><td>${crackscan.num(h.width_max_mm, 2)}</td></tr>`).join("")}</table>
       <div class="columns">${chart(c.history, "length_mm", "length (mm)")}${chart(c.history, "width_max_mm", "maximum width (mm)")}</div>`;
  }
  form.addEventListener("submit", async e => {
    e.preventDefault();
    const say = document.querySelector("#review-status");
    const body = {verdict: form.verdict.value, note: form.note.value, reviewer: form.reviewer.value.trim(),
                  reason: form.verdict.value === "rejected" ? form.reason.value : null};
    try {
      await crackscan.api(`/api/runs/${enc}/cracks/${number}/review`,
        {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      localStorage.setItem("crackscan.reviewer", body.reviewer);
      say.textContent = "stored"; say.className = "";
      form.note.value = "";
      await load();
    } catch (error) { say.textContent = error.message; say.className = "error"; }
  });
  await load();
})();
