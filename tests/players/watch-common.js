// Page-side state of a watching player, read by watch.mjs at every sample.
window.watch = {
  fatal: null,          // the first fatal error, or null
  buffering: true,      // until the first `playing`
  events: [],           // {event: 'error' | 'log' | 'ended', ...}, drained at every sample
  push(event) { this.events.push(event); },
  drain() { const events = this.events; this.events = []; return events; },
};
window.source = new URLSearchParams(location.search).get("src");
window.addEventListener("error", (e) => watch.push({ event: "log", level: "pageerror", msg: String(e.message) }));
window.addEventListener("unhandledrejection", (e) =>
  watch.push({ event: "log", level: "rejection", msg: String(e.reason && (e.reason.message || e.reason.code || e.reason)) }));
document.addEventListener("DOMContentLoaded", () => {
  const video = document.getElementById("v");
  video.addEventListener("ended", () => watch.push({ event: "ended", at: video.currentTime }));
  video.addEventListener("waiting", () => { watch.buffering = true; });
  video.addEventListener("playing", () => { watch.buffering = false; });
});
