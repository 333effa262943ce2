// Web players watching one live playlist in Debian's headless Chromium, sampled for the tests
// and bench/continuity.py: is each one still playing?
//
//   node watch.mjs URL [--players hlsjs,shaka] [--interval S] [--seconds S]
//
// Each player gets a page of its own (a window each: neither is a background tab), served by
// this script on 127.0.0.1 under the name "localhost", another origin than nginx's.  Prints one
// JSON line per player per sample on stdout:
//   {"t": epoch seconds, "player": "hlsjs", "time": video.currentTime,
//    "frames": video frames decoded and not dropped, "buffering": bool, "fatal": null | {...}}
// and lines for what the page saw in between: {"t", "player", "event": "error" | "log" | "ended", ...}.
// `frames` is the progress to trust: Shaka moves currentTime forward while it is stuck buffering.
// Runs until SIGTERM or --seconds; exit 0, or 2 on bad usage or a browser that cannot start.
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium, servePages } from "./browser.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const PAGES = {
  "/watch-common.js": ["watch-common.js", "text/javascript"],
  "/hls.js": ["node_modules/hls.js/dist/hls.min.js", "text/javascript"],
  "/shaka-player.js": ["node_modules/shaka-player/dist/shaka-player.compiled.js", "text/javascript"],
  "/hlsjs.html": ["watch-hlsjs.html", "text/html; charset=utf-8"],
  "/shaka.html": ["watch-shaka.html", "text/html; charset=utf-8"],
};
const PLAYERS = new Set(["hlsjs", "shaka"]);

function parseArgs(argv) {
  const options = { url: null, players: ["hlsjs", "shaka"], interval: 0.25, seconds: 0 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--players") options.players = argv[++i].split(",");
    else if (arg === "--interval") options.interval = Number(argv[++i]);
    else if (arg === "--seconds") options.seconds = Number(argv[++i]);
    else if (options.url === null) options.url = arg;
    else options.url = undefined;
  }
  if (!options.url || !options.players.every((p) => PLAYERS.has(p)) || !(options.interval > 0)
      || !(options.seconds >= 0)) {
    process.stderr.write("usage: watch.mjs URL [--players hlsjs,shaka] [--interval S] [--seconds S]\n");
    process.exit(2);
  }
  return options;
}

const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const epoch = () => Date.now() / 1000;

// A page that cannot be read once (a context being replaced, a slow evaluate under load) is
// said as an event; only UNREADABLE_FATAL reads in a row make it a fatal error of the player.
const UNREADABLE_FATAL = 20;

async function sample(watched) {
  try {
    const state = await watched.page.evaluate(() => {
      const video = document.getElementById("v");
      const quality = video.getVideoPlaybackQuality();
      return { time: video.currentTime, frames: quality.totalVideoFrames - quality.droppedVideoFrames,
               buffering: watch.buffering, fatal: watch.fatal, events: watch.drain() };
    });
    watched.unreadable = 0;
    const t = epoch();
    for (const event of state.events) print({ t, player: watched.name, ...event });
    print({ t, player: watched.name, time: state.time, frames: state.frames, buffering: state.buffering,
            fatal: state.fatal });
  } catch (error) {
    watched.unreadable = (watched.unreadable || 0) + 1;
    const msg = `page unreadable: ${String(error.message).split("\n")[0]}`;
    print({ t: epoch(), player: watched.name, event: "log", level: "unreadable", msg });
    if (watched.unreadable >= UNREADABLE_FATAL) {
      print({ t: epoch(), player: watched.name, time: null, frames: null, buffering: false, fatal: { msg } });
    }
  }
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const { server, origin } = await servePages(here, PAGES);
  const browser = await launchChromium(server);
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await browser.close().catch(() => {});
    server.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  const watched = [];
  for (const name of options.players) {
    const context = await browser.newContext({ viewport: { width: 400, height: 240 } });
    const page = await context.newPage();
    await page.goto(`${origin}/${name}.html?src=${encodeURIComponent(options.url)}`);
    watched.push({ name, page });
  }
  const began = epoch();
  while (!stopping && !(options.seconds && epoch() - began >= options.seconds)) {
    const tick = Date.now();
    await Promise.all(watched.map(sample));
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, options.interval * 1000 - (Date.now() - tick))));
  }
  await stop();
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(2);
});
