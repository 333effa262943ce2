// What the web-player drivers share: Debian's headless Chromium, started the one way this
// host allows, and the pages served from another origin than nginx's.
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Headless and quiet: no GPU, no background calls to the outside (this host has no network),
// autoplay without a click.  --no-sandbox because tests may run as root.
const CHROMIUM_ARGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
];

// Serves `files` (path -> [file under `directory`, content type]) on 127.0.0.1, reached as
// "localhost": another origin than nginx's, so every answer must carry CORS headers for the
// page to see it.  Resolves to {server, origin}.
export function servePages(directory, files) {
  const server = createServer((request, response) => {
    const file = files[new URL(request.url, "http://localhost").pathname];
    if (!file) {
      response.writeHead(404);
      response.end();
      return;
    }
    response.writeHead(200, { "Content-Type": file[1], "Cache-Control": "no-store" });
    response.end(readFileSync(join(directory, file[0])));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () =>
    resolve({ server, origin: `http://localhost:${server.address().port}` })));
}

// Chromium, or exit 2 with one line (and the page server closed) when it cannot start.
export async function launchChromium(server) {
  try {
    return await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  } catch (error) {
    process.stderr.write(`cannot start ${CHROMIUM}: ${error.message}\n`);
    server.close();
    process.exit(2);
  }
}
