// Shared Node-side harness for the headless-Chromium e2e tests.
//
//  - startServer(): spawns one opencalls server (binary from $OPENCALLS_BIN) on
//    127.0.0.1 with an OS-chosen HTTP port (read back from its "API base URL:"
//    line) and OS-chosen UDP ports, waits for "opencalls is ready" and /healthz,
//    and captures stdout+stderr into a log file.
//  - startPageServer(): a tiny node http server on 127.0.0.1 (its own port, so
//    the pages' API calls are cross-origin) serving e2e/browser/pages/, plus
//    optional extra routes (used by the partytracks proxy).
//  - launchBrowser(): Chromium exactly as reference/test-peers.md §1 says.
//  - suite(): wires the three together with before()/after() for one test file,
//    and evidence(): on failure dumps page state, SDPs, HTTP log and the server
//    log tail into the artifacts directory.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { before, after } from 'node:test';
import { chromium } from 'playwright-core';

export const HERE = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
export const PAGES = path.join(HERE, 'pages');
// Default: the repo's debug build (/work/main/target/debug/opencalls here).
export const OPENCALLS_BIN = process.env.OPENCALLS_BIN || path.resolve(HERE, '../../target/debug/opencalls');
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const ARTIFACTS = process.env.E2E_ARTIFACTS_DIR || path.join(HERE, 'artifacts');
// Server log filter. RUST_LOG wins; the default keeps opencalls at debug.
export const SERVER_RUST_LOG = process.env.RUST_LOG || 'opencalls=debug,opencalls_server=debug,opencalls_sfu=debug,warn';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// A timer that does not keep the process alive (for Promise.race bounds).
const bound = (ms, value) => new Promise((r) => setTimeout(r, ms, value).unref());

function randHex(n) {
  return [...crypto.getRandomValues(new Uint8Array(n))].map((b) => b.toString(16).padStart(2, '0')).join('');
}

// ---------------------------------------------------------------- server

export async function startServer({ name = 'opencalls', workers = 2, readyTimeoutMs = 20000 } = {}) {
  if (!fs.existsSync(OPENCALLS_BIN)) {
    throw new Error(`opencalls binary not found at ${OPENCALLS_BIN} (build it with: cargo build -p opencalls-server, or set OPENCALLS_BIN)`);
  }
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const appId = randHex(16);
  const secret = randHex(32);
  const logFile = path.join(ARTIFACTS, `${name}.server.log`);
  const log = fs.createWriteStream(logFile);
  const args = ['serve', '--http', '127.0.0.1:0', '--udp', '127.0.0.1:0', '--app', `${appId}:${secret}`, '--workers', String(workers)];
  const proc = spawn(OPENCALLS_BIN, args, {
    env: { ...process.env, RUST_LOG: SERVER_RUST_LOG, NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const srv = { proc, appId, secret, logFile, exited: null, apiBase: null, mediaAddrs: [] };
  // Attach the exit listener immediately (test-peers.md gotcha).
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => {
    srv.exited = { code, signal };
    resolve(srv.exited);
  }));
  let out = '';
  let tail = [];
  const onData = (stream) => (chunk) => {
    const s = chunk.toString();
    log.write(s);
    if (stream === 'stdout' && !srv.apiBase) out += s;
    tail.push(s);
    if (tail.length > 4000) tail = tail.slice(-2000);
  };
  proc.stdout.on('data', onData('stdout'));
  proc.stderr.on('data', onData('stderr'));
  srv.tail = (n = 80) => tail.join('').split('\n').slice(-n).join('\n');

  const deadline = Date.now() + readyTimeoutMs;
  while (!/opencalls is ready[\s\S]*Press Ctrl-C/.test(out)) {
    if (srv.exited) throw new Error(`opencalls exited early (${JSON.stringify(srv.exited)}):\n${srv.tail()}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`opencalls did not print "opencalls is ready" within ${readyTimeoutMs} ms:\n${srv.tail()}`);
    }
    await sleep(50);
  }
  const m = out.match(/API base URL:\s+(\S+)/);
  if (!m) throw new Error(`could not find "API base URL:" in the server output:\n${out}`);
  // We bound the API to 127.0.0.1; keep the printed port and path but address it
  // by IP, so that no name resolution is involved (the banner may say localhost).
  const printed = new URL(m[1]);
  srv.apiBase = `http://127.0.0.1:${printed.port}${printed.pathname}`.replace(/\/$/, '');
  srv.mediaAddrs = [...out.matchAll(/media worker \d+: udp (.*)/g)].map((x) => x[1].trim());
  const health = await fetch(new URL('/healthz', srv.apiBase).href);
  if (health.status !== 200) throw new Error(`/healthz answered ${health.status}`);

  srv.stop = async () => {
    if (!srv.exited) {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(t);
    }
    await new Promise((r) => log.end(r));
  };
  return srv;
}

// ---------------------------------------------------------------- pages

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8', '.json': 'application/json', '.map': 'application/json' };

// `routes`: optional async (req, res, url) => boolean; return true when handled.
export async function startPageServer({ routes } = {}) {
  const server = http.createServer(async (req, res) => {
    try {
      const url = new URL(req.url, 'http://127.0.0.1');
      if (routes && (await routes(req, res, url))) return;
      let rel = decodeURIComponent(url.pathname);
      if (rel === '/') rel = '/index.html';
      const file = path.join(PAGES, path.normalize(rel));
      if (!file.startsWith(PAGES + path.sep)) { res.writeHead(403).end(); return; }
      const body = await fsp.readFile(file).catch(() => null);
      if (!body) { res.writeHead(404).end('not found'); return; }
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] || 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(body);
    } catch (e) {
      if (!res.headersSent) res.writeHead(500);
      res.end(String(e?.stack || e));
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    origin,
    close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }),
  };
}

// ---------------------------------------------------------------- browser

export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  // Several participants live in several tabs of one browser: never throttle
  // the ones that are not in front.
  '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found; run e2e/browser/setup.sh`);
  const udd = fs.mkdtempSync(path.join(os.tmpdir(), 'opencalls-e2e-chr-')); // fresh profile
  const ctx = await chromium.launchPersistentContext(udd, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  return {
    ctx,
    async close() {
      await Promise.race([ctx.close().catch(() => {}), bound(10000)]);
      fs.rmSync(udd, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------- suite

// One server + one page server + one browser per test file.
// Returns an object whose fields are filled in by before().
export function suite(name, { routes, workers = 2 } = {}) {
  const S = { name, pages: [] };
  before(async () => {
    S.server = await startServer({ name, workers });
    S.web = await startPageServer({ routes: routes ? (req, res, url) => routes(S, req, res, url) : undefined });
    S.browser = await launchBrowser();
  });
  after(async () => {
    await S.browser?.close();
    await S.web?.close();
    await S.server?.stop();
    if (S.server?.exited && S.server.exited.signal && S.server.exited.signal !== 'SIGTERM') {
      console.error(`opencalls ended with ${JSON.stringify(S.server.exited)}`);
    }
  });
  // Opens a fresh tab on the test page, configured for this server.
  // `credentials: false` leaves the API location and secret out of the URL
  // (pages that reach the API only through a proxy of ours).
  S.openPage = async (label, file = 'index.html', { credentials = true } = {}) => {
    const page = await S.browser.ctx.newPage();
    page.__label = label;
    page.__console = [];
    page.on('console', (m) => page.__console.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => page.__console.push(`[pageerror] ${e.message}`));
    const q = new URLSearchParams({ api: S.server.apiBase, app: S.server.appId, secret: S.server.secret });
    await page.goto(`${S.web.origin}/${file}${credentials ? `?${q}` : ''}`, { waitUntil: 'domcontentloaded' });
    await page.waitForFunction(() => window.P && window.P.ready, null, { timeout: 10000 });
    S.pages.push(page);
    return page;
  };
  S.closePages = async () => {
    for (const p of S.pages.splice(0)) await p.close().catch(() => {});
  };
  // Runs fn; on failure writes the evidence (page state incl. SDPs and every
  // HTTP exchange, console output, server log tail) and rethrows.
  S.evidence = async (testName, fn) => {
    const t0 = Date.now();
    try {
      return await fn();
    } catch (err) {
      const file = path.join(ARTIFACTS, `${name}--${testName.replace(/[^a-z0-9]+/gi, '-')}.evidence.json`);
      const pages = [];
      for (const p of S.pages) {
        let debug = null;
        try { debug = await Promise.race([p.evaluate(() => window.P?.debug?.() ?? null), bound(3000, 'timeout')]); } catch (e) { debug = String(e); }
        pages.push({ label: p.__label, debug, console: p.__console });
      }
      const ev = { test: testName, error: String(err?.stack || err), elapsedMs: Date.now() - t0, server: { apiBase: S.server?.apiBase, log: S.server?.logFile, exited: S.server?.exited }, pages };
      fs.writeFileSync(file, JSON.stringify(ev, null, 2));
      err.message += `\n  evidence: ${file}\n  server log: ${S.server?.logFile}\n  server log tail:\n${S.server?.tail(25)}`;
      throw err;
    }
  };
  return S;
}

// ---------------------------------------------------------------- helpers for the tests

// page.evaluate with a hard time bound, so a hung promise in the page fails the
// test instead of hanging it.
export async function inPage(page, fn, arg, timeoutMs = 20000) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`page ${page.__label}: evaluate timed out after ${timeoutMs} ms: ${fn.toString().slice(0, 120)}`)), timeoutMs);
  });
  try {
    return await Promise.race([page.evaluate(fn, arg), limit]);
  } finally {
    clearTimeout(timer);
  }
}

// The API's own view of a session, fetched from Node (used for cross-checks).
export async function apiGet(S, path) {
  const r = await fetch(`${S.server.apiBase}/apps/${S.server.appId}/${path}`, { headers: { Authorization: `Bearer ${S.server.secret}` } });
  return { status: r.status, body: await r.json().catch(() => null) };
}
