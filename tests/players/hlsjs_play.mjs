// hls.js in Debian's headless Chromium, driven by playwright-core: what a browser viewer runs.
//
//   node hlsjs_play.mjs play URL [URL...] [--seconds S] [--timeout S] [--screenshot FILE]
//       Plays each playlist URL in turn, each in a fresh page, until video.currentTime passes
//       S seconds (0: until the first `playing`), a fatal hls.js error, or the timeout.
//   node hlsjs_play.mjs fetch URL [URL...]
//       fetch()es each URL from the page (what a web player does to show why a channel
//       failed): status and body as the browser lets the page see them (CORS applies).
//
// The page is served by this script on 127.0.0.1 under the name "localhost", a different
// origin from nginx's, so every answer must carry CORS headers for the page to see it.
// Prints one JSON object per URL on stdout; exit 0 when every URL did what was asked, 1 if
// not, 2 on bad usage or a browser that cannot start.
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium, servePages } from "./browser.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const PAGES = {
  "/": ["player.html", "text/html; charset=utf-8"],
  "/hls.js": ["node_modules/hls.js/dist/hls.min.js", "text/javascript"],
};

function parseArgs(argv) {
  const [mode, ...rest] = argv;
  const options = { mode, urls: [], seconds: 15, timeout: 60, screenshot: null };
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i];
    if (arg === "--seconds") options.seconds = Number(rest[++i]);
    else if (arg === "--timeout") options.timeout = Number(rest[++i]);
    else if (arg === "--screenshot") options.screenshot = rest[++i];
    else options.urls.push(arg);
  }
  if (!["play", "fetch"].includes(mode) || options.urls.length === 0
      || !(options.seconds >= 0) || !(options.timeout > 0)) {
    process.stderr.write("usage: hlsjs_play.mjs play|fetch URL... [--seconds S] [--timeout S] [--screenshot FILE]\n");
    process.exit(2);
  }
  return options;
}

async function play(page, origin, url, options) {
  const started = Date.now();
  await page.goto(`${origin}/?src=${encodeURIComponent(url)}`);
  const deadline = started + options.timeout * 1000;
  let state = await page.evaluate(() => window.player);
  while (Date.now() < deadline) {
    state = await page.evaluate(() => window.player);
    if (!state.supported || state.fatal) break;
    const target = options.seconds > 0 ? state.currentTime >= options.seconds : state.playingAt !== null;
    if (target) break;
    await page.waitForTimeout(100);
  }
  const reached = options.seconds > 0 ? state.currentTime >= options.seconds : state.playingAt !== null;
  const firstPicture = state.playingAt !== null && state.manifestLoadingAt !== null
    ? (state.playingAt - state.manifestLoadingAt) / 1000 : null;
  return {
    url, ok: Boolean(state.supported && reached && !state.fatal), supported: state.supported,
    current_time: state.currentTime, first_request_to_playing: firstPicture,
    fatal: state.fatal, errors: state.errors,
  };
}

async function fetchFromPage(page, origin, url) {
  await page.goto(`${origin}/`);
  return page.evaluate(async (target) => {
    try {
      const response = await fetch(target);
      return { url: target, ok: true, status: response.status, body: await response.text(),
               retry_after: response.headers.get("Retry-After") };
    } catch (error) {
      // What a browser reports when CORS blocks the answer: no status, no body.
      return { url: target, ok: false, error: String(error) };
    }
  }, url);
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const { server, origin } = await servePages(here, PAGES);
  const browser = await launchChromium(server);
  let allOk = true;
  try {
    for (const url of options.urls) {
      const context = await browser.newContext({ viewport: { width: 640, height: 400 } });
      const page = await context.newPage();
      const result = options.mode === "play"
        ? await play(page, origin, url, options)
        : await fetchFromPage(page, origin, url);
      if (options.mode === "play" && options.screenshot) {
        await page.screenshot({ path: options.screenshot });
      }
      allOk = allOk && result.ok;
      process.stdout.write(JSON.stringify(result) + "\n");
      await context.close();
    }
  } finally {
    await browser.close();
    server.close();
  }
  process.exit(allOk ? 0 : 1);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(2);
});
