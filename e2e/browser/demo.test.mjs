// The built-in demo served by `opencalls serve` itself (no page server of ours), and a
// third-party publisher (aiortc) decoded by the browser.
//  - echo demo: the page sees itself come back through the SFU;
//  - room demo: two participants in one room see each other's video; a screenshot of
//    the room goes to target/demo-room.png; the browser never sees the app secret;
//  - aiortc publishes, the browser pulls and decodes it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { suite, inPage, sleep, HERE } from './lib/harness.mjs';

const S = suite('demo');
const REPO = path.resolve(HERE, '../..');
const origin = () => new URL(S.server.apiBase).origin;

async function waitFor(page, fn, what, timeoutMs = 15000, arg = undefined) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await inPage(page, fn, arg);
    if (last && last.ok) return last;
    await sleep(250);
  }
  throw new Error(`${what}: not reached in ${timeoutMs} ms (last: ${JSON.stringify(last)})`);
}

function watchSecret(page) {
  const seen = [];
  page.on('request', (r) => {
    const h = r.headers();
    if (h.authorization || r.url().includes(S.server.secret) || (r.postData() || '').includes(S.server.secret)) seen.push(r.url());
  });
  page.on('response', async (r) => {
    const body = await r.text().catch(() => '');
    if (body.includes(S.server.secret)) seen.push(`response ${r.url()}`);
  });
  return seen;
}

test('echo demo: see yourself come back through the SFU, with stats', { timeout: 60000 }, async () => {
  const page = await S.browser.ctx.newPage();
  const leaks = watchSecret(page);
  await page.goto(`${origin()}/demo/echo`, { waitUntil: 'domcontentloaded' });
  const s = await waitFor(page, () => {
    const st = window.echoState;
    return { ...st, ok: st && st.framesDecoded > 10 && st.audioPackets > 20, stats: document.getElementById('stats').textContent };
  }, 'echo frames');
  assert.match(s.stats, /bitrate in\s+\d+ kbit\/s/);
  assert.match(s.stats, /RTT\s+\d/);
  assert.deepEqual(leaks, [], 'the echo page never sees the app secret');
  await page.close();
});

test('room demo: two participants see each other; screenshot saved', { timeout: 90000 }, async () => {
  const room = `r${Date.now()}`;
  const alice = await S.browser.ctx.newPage();
  const bob = await S.browser.ctx.newPage();
  const leaks = [...[alice, bob].map(watchSecret)];
  await alice.goto(`${origin()}/demo/room?room=${room}&name=alice&autojoin=1`, { waitUntil: 'domcontentloaded' });
  await bob.goto(`${origin()}/demo/room?room=${room}&name=bob&autojoin=1`, { waitUntil: 'domcontentloaded' });
  const sees = (other) => {
    const st = window.roomState;
    const f = st && st.remote[other] ? st.remote[other].framesDecoded : 0;
    return { ok: f > 10, frames: f, error: st && st.error };
  };
  await waitFor(alice, sees, 'alice sees bob', 30000, 'bob');
  await waitFor(bob, sees, 'bob sees alice', 30000, 'alice');
  const shot = path.join(REPO, 'target', 'demo-room.png');
  fs.mkdirSync(path.dirname(shot), { recursive: true });
  await alice.screenshot({ path: shot });
  assert.ok(fs.statSync(shot).size > 10000, 'screenshot written');
  assert.deepEqual(leaks.flat(), [], 'the room pages never see the app secret');

  // Bob leaves: alice's tile for him goes away (presence), and she keeps her own.
  await bob.click('#leave');
  await waitFor(alice, () => ({ ok: !document.querySelector('.tile:not(#tile-me)') && !!document.querySelector('#tile-me') }), 'bob gone from alice', 20000);
  await alice.close();
  await bob.close();
});

test('aiortc publishes, the browser decodes', { timeout: 90000 }, async () => {
  const py = process.env.E2E_PYTHON || path.join(REPO, 'target/e2e-venv/bin/python');
  assert.ok(fs.existsSync(py), `aiortc python not found at ${py} (scripts/test installs it)`);
  const pub = spawn(py, [path.join(REPO, 'e2e/aiortc/aiortc_publisher.py'), S.server.apiBase, S.server.appId, S.server.secret, '--seconds', '40'], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const line = await new Promise((resolve, reject) => {
      pub.on('exit', (c) => reject(new Error(`aiortc publisher exited (${c})`)));
      readline.createInterface({ input: pub.stdout }).once('line', resolve);
      setTimeout(() => reject(new Error('aiortc publisher printed nothing in 20 s')), 20000);
    });
    const { sessionId, trackName } = JSON.parse(line);
    const page = await S.browser.ctx.newPage();
    await page.goto(`${origin()}/`, { waitUntil: 'domcontentloaded' });
    const r = await inPage(page, async ([sessionId, trackName]) => {
      const { CallsSession } = await import('/demo/calls.js');
      const s = await CallsSession.create();
      const got = await s.pull([{ sessionId, trackName }]);
      window.sub = s;
      return got.map((g) => ({ mid: g.mid, error: g.errorCode || null }));
    }, [sessionId, trackName], 20000);
    assert.equal(r.length, 1);
    assert.equal(r[0].error, null);
    const s = await waitFor(page, async () => {
      const inbound = Object.values(await window.sub.inbound());
      const v = inbound.find((x) => x.kind === 'video') || {};
      return { ok: v.framesDecoded > 10, frames: v.framesDecoded };
    }, 'browser decodes aiortc video', 20000);
    assert.ok(s.frames > 10);
    await page.close();
  } finally {
    pub.kill('SIGKILL');
  }
});
