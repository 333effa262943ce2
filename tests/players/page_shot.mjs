// A page as a person sees it, in Debian's headless Chromium: the operators' status page.
//
//   node page_shot.mjs URL --wait-for TEXT --screenshot FILE [--timeout S]
//
// Opens URL, waits until the page's text contains TEXT, keeps a screenshot, and prints one
// JSON object: {ok, text (the page's visible text), errors (what the page logged as errors)}.
// Exit 0 when TEXT appeared, 1 if not, 2 on bad usage or a browser that cannot start.
import { launchChromium, servePages } from "./browser.mjs";

function parseArgs(argv) {
  const options = { url: null, waitFor: null, screenshot: null, timeout: 30 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--wait-for") options.waitFor = argv[++i];
    else if (argv[i] === "--screenshot") options.screenshot = argv[++i];
    else if (argv[i] === "--timeout") options.timeout = Number(argv[++i]);
    else options.url = argv[i];
  }
  if (!options.url || !options.waitFor || !options.screenshot || !(options.timeout > 0)) {
    process.stderr.write("usage: page_shot.mjs URL --wait-for TEXT --screenshot FILE [--timeout S]\n");
    process.exit(2);
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const { server } = await servePages(".", {});
  const browser = await launchChromium(server);
  const errors = [];
  let ok = false;
  let text = "";
  try {
    const page = await (await browser.newContext({ viewport: { width: 1100, height: 800 } })).newPage();
    page.on("console", (message) => { if (message.type() === "error") errors.push(message.text()); });
    page.on("pageerror", (error) => errors.push(String(error)));
    await page.goto(options.url);
    const deadline = Date.now() + options.timeout * 1000;
    while (Date.now() < deadline) {
      text = await page.evaluate(() => document.body.innerText);
      if (text.includes(options.waitFor)) { ok = true; break; }
      await page.waitForTimeout(200);
    }
    await page.screenshot({ path: options.screenshot, fullPage: true });
  } finally {
    await browser.close();
    server.close();
  }
  process.stdout.write(JSON.stringify({ ok, text, errors }) + "\n");
  process.exit(ok ? 0 : 1);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(2);
});
