// Shared helpers of the crackscan pages: API calls with readable errors, formatting, elements.
"use strict";
const crackscan = {
  async api(path, options) {
    const response = await fetch(path, Object.assign({credentials: "same-origin"}, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    }
    return body;
  },
  num(value, decimals) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(decimals === undefined ? 1 : decimals);
  },
  esc(text) {
    return String(text === null || text === undefined ? "" : text).replace(/[&<>"']/g,
      c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  },
  date(iso) { return iso ? iso.replace("T", " ").slice(0, 16) : "–"; },
  verdictBadge(verdict, reason) {
    const text = verdict ? verdict.replace("_", " ") + (reason ? ` (${reason})` : "") : "not reviewed";
    return `<span class="badge verdict-${verdict || "none"}">${crackscan.esc(text)}</span>`;
  },
  severityBadges(counts, classes) {
    const names = classes ? classes.map(c => c.name) : Object.keys(counts);
    const colour = Object.fromEntries((classes || []).map(c => [c.name, c.colour]));
    return names.filter(n => counts[n]).map(n =>
      `<span class="badge" style="background:${colour[n] || "#607d8b"}" title="${crackscan.esc(n)}">${crackscan.esc(n)} ${counts[n]}</span>`
    ).join("") || '<span class="muted">none</span>';
  },
  fail(where, error) {
    const box = document.querySelector(where);
    if (box) box.innerHTML = `<p class="error">${crackscan.esc(error.message || error)}</p>`;
  },
};
