// The status page: /status.json every few seconds, written into the page as text only
// (everything it shows comes from Redis, which is hostile: never markup).
"use strict";
const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  const s = Math.round(value);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
       : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function fill(body, rows, empty, columns) {
  body.replaceChildren();
  if (!rows.length) {
    const row = body.insertRow();
    const td = cell(row, empty, "empty");
    td.colSpan = columns;
    return;
  }
  for (const draw of rows) draw(body.insertRow());
}

function chart(history, now) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  const width = 720, height = 180, pad = 24;
  const since = now - 3600;
  const points = history.filter((p) => p.t >= since);
  const top = Math.max(1, ...points.map((p) => Math.max(p.streams, p.viewers)));
  const axis = document.createElementNS(SVG, "text");
  axis.setAttribute("x", 4); axis.setAttribute("y", 14); axis.setAttribute("font-size", "11");
  axis.textContent = `max ${top}`;
  svg.appendChild(axis);
  for (const [label, x] of [["-60 min", pad], ["-30 min", width / 2], ["now", width - pad]]) {
    const tick = document.createElementNS(SVG, "text");
    tick.setAttribute("x", x); tick.setAttribute("y", height - 6); tick.setAttribute("font-size", "11");
    tick.setAttribute("text-anchor", "middle");
    tick.textContent = label;
    svg.appendChild(tick);
  }
  const xy = (p, key) => [pad + (width - 2 * pad) * (p.t - since) / 3600,
                          height - pad - (height - 2 * pad) * p[key] / top];
  for (const [key, color] of [["streams", "#0969da"], ["viewers", "#8250df"]]) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2");
    line.setAttribute("points", points.map((p) => xy(p, key).map((v) => v.toFixed(1)).join(",")).join(" "));
    svg.appendChild(line);
    for (const p of points) {                    // each sample a dot: one sample shows too
      const [x, y] = xy(p, key);
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x.toFixed(1)); dot.setAttribute("cy", y.toFixed(1)); dot.setAttribute("r", "2.5");
      dot.setAttribute("fill", color);
      svg.appendChild(dot);
    }
  }
}

function render(data) {
  document.getElementById("host").textContent = `· host ${data.host}`;
  document.getElementById("updated").textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
  const pass = data.reaper_last_pass || {};
  document.getElementById("reaper").textContent = pass.time
    ? `reaper: last pass ${seconds(data.now - Number(pass.time))} ago, stopped ${pass.stopped}, stale ${pass.stale}, ${pass.passes} passes`
    : "reaper: no pass recorded";
  fill(document.getElementById("streams"), data.streams.map((s) => (row) => {
    cell(row, s.id); cell(row, s.state, s.state); cell(row, s.viewers, "num");
    cell(row, seconds(s.idle_seconds), "num"); cell(row, seconds(s.uptime_seconds), "num");
    cell(row, s.restarts, "num"); cell(row, s.speed === null ? null : `${s.speed.toFixed(2)}×`, "num");
    cell(row, s.source); cell(row, s.provider); cell(row, s.last_error, "error");
  }), "no stream runs", 10);
  fill(document.getElementById("providers"), data.providers.map((p) => (row) => {
    cell(row, p.provider); cell(row, `${p.channels.length} / ${p.limit || "no limit"}`, "num");
    cell(row, p.channels.join(", "));
  }), "no provider configured", 3);
  fill(document.getElementById("failed"), data.failed.map((f) => (row) => {
    cell(row, f.id); cell(row, f.reason, "error"); cell(row, seconds(f.cooldown_seconds), "num"); cell(row, f.host);
  }), "none", 4);
  chart(data.history || [], data.now);
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const answer = await fetch("/status.json", { cache: "no-store" });
    const data = await answer.json();
    if (!answer.ok) throw new Error(data.error || `HTTP ${answer.status}`);
    problem.textContent = "";
    render(data);
  } catch (error) {
    problem.textContent = `cannot read the launcher's status: ${error.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
