// (d) partytracks 0.0.54 (npm), Cloudflare's client library, in a page of our
// own, behind our own small Node proxy that hands /partytracks/* to the library's
// server helper routePartyTracksRequest() pointed at opencalls (interop.md §2.4,
// §4.2). The browser never sees the secret. One PartyTracks instance = one
// RTCPeerConnection used for push and pull, so offer/answer roles flip.
//
// Flow: "pub" pushes camera + mic; "sub" (another instance) pulls both; "pub"
// pulls its own video back over the same PC (loopback); "sub" unsubscribes the
// video (partytracks does the negotiated tracks/close) while audio keeps flowing;
// "sub" pulls the video again. Each step asserts decoded frames.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Readable } from 'node:stream';
import { build } from 'esbuild';
import { routePartyTracksRequest } from 'partytracks/server';
import { suite, inPage, PAGES, sleep } from './lib/harness.mjs';

// Node 20 gotcha (interop.md §4.2): the helper passes the incoming request's
// body stream to fetch(), and undici then insists on `duplex: "half"`.
const realFetch = globalThis.fetch;
globalThis.fetch = (input, init) => realFetch(input, init && init.body != null && !init.duplex ? { ...init, duplex: 'half' } : init);

let bundle = null;
const proxyLog = [];
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'host', 'proxy-connection']);

async function routes(S, req, res, url) {
  if (url.pathname === '/partytracks-app.bundle.js') {
    res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8', 'cache-control': 'no-store' }).end(bundle);
    return true;
  }
  if (!url.pathname.startsWith('/partytracks/')) return false;
  // Never hand out stun.cloudflare.com (the helper's default): stay on loopback.
  if (url.pathname === '/partytracks/generate-ice-servers') {
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ iceServers: [] }));
    return true;
  }
  const headers = new Headers();
  for (const [k, v] of Object.entries(req.headers)) if (!HOP_BY_HOP.has(k)) headers.set(k, Array.isArray(v) ? v.join(', ') : v);
  const hasBody = req.method !== 'GET' && req.method !== 'HEAD';
  const request = new Request(`${S.web.origin}${req.url}`, {
    method: req.method, headers, body: hasBody ? Readable.toWeb(req) : undefined, duplex: 'half',
  });
  const upstream = await routePartyTracksRequest({
    appId: S.server.appId,
    token: S.server.secret,
    realtimeApiBaseUrl: S.server.apiBase,
    request,
  });
  const body = Buffer.from(await upstream.arrayBuffer());
  const out = {};
  upstream.headers.forEach((v, k) => { if (!['content-length', 'transfer-encoding', 'content-encoding', 'connection'].includes(k)) out[k] = v; });
  res.writeHead(upstream.status, out).end(body);
  proxyLog.push({ method: req.method, path: url.pathname, status: upstream.status });
  return true;
}

const S = suite('partytracks', { routes });

before(async () => {
  const r = await build({
    entryPoints: [path.join(PAGES, 'partytracks-app.js')],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'chrome120',
    write: false,
    logLevel: 'silent',
    define: { 'process.env.NODE_ENV': '"development"' },
  });
  bundle = r.outputFiles[0].text;
});

const SIZE = { width: 480, height: 360 };

test('partytracks 0.0.54: push, pull, loopback pull, close, pull again', { timeout: 90000 }, async () => {
  await S.evidence('partytracks', async () => {
    const page = await S.openPage('partytracks', 'partytracks.html', { credentials: false });
    await inPage(page, () => { window.PT.create('pub'); window.PT.create('sub'); });

    // push (client offer; partytracks batches both tracks into one tracks/new)
    const meta = await inPage(page, (size) => window.PT.push('pub', size), SIZE, 30000);
    for (const kind of ['audio', 'video']) {
      assert.equal(meta[kind].location, 'remote');
      assert.ok(meta[kind].trackName && meta[kind].sessionId, JSON.stringify(meta));
    }

    // pull into another PartyTracks instance (SFU offer + renegotiate)
    await inPage(page, (m) => Promise.all([window.PT.pull('sub', 'sub:audio', m.audio), window.PT.pull('sub', 'sub:video', m.video)]), meta, 30000);
    const v1 = await inPage(page, (w) => window.PT.waitMedia('sub:video', { timeoutMs: 5000, width: w }), SIZE.width);
    const a1 = await inPage(page, () => window.PT.waitMedia('sub:audio', { timeoutMs: 5000 }));
    console.log(`partytracks: first frame ${v1.ms} ms after the pull resolved (width ${v1.frameWidth}), audio after ${a1.ms} ms`);

    // loopback: the publisher's own PC pulls its video back (push and pull on one PC)
    await inPage(page, (m) => window.PT.pull('pub', 'pub:video', m.video), meta, 30000);
    await inPage(page, (w) => window.PT.waitMedia('pub:video', { timeoutMs: 5000, width: w }), SIZE.width);

    // close: unsubscribing the pulled video makes partytracks send tracks/close
    // with an offer and apply the answer; audio must keep flowing.
    const audioBefore = await inPage(page, () => window.PT.stats('sub:audio'));
    const closed = await inPage(page, () => window.PT.unpull('sub:video'));
    assert.equal(closed.response.sessionDescription?.type, 'answer', JSON.stringify(closed.response).slice(0, 300));
    assert.equal(closed.signalingState, 'stable');
    assert.ok(!closed.response.errorCode, JSON.stringify(closed.response).slice(0, 300));
    await sleep(1000);
    const audioAfter = await inPage(page, () => window.PT.stats('sub:audio'));
    assert.ok(audioAfter.packetsReceived >= audioBefore.packetsReceived + 20, `audio after close: ${audioBefore.packetsReceived} -> ${audioAfter.packetsReceived}`);

    // pull again
    await inPage(page, (m) => window.PT.pull('sub', 'sub:video2', m.video), meta, 30000);
    const v2 = await inPage(page, (w) => window.PT.waitMedia('sub:video2', { timeoutMs: 5000, width: w, minFrames: 5 }), SIZE.width);
    assert.ok(v2.framesDecoded >= 5);

    // And the loopback video on the publisher's PC kept going all along.
    const lb1 = await inPage(page, () => window.PT.stats('pub:video'));
    await sleep(1000);
    const lb2 = await inPage(page, () => window.PT.stats('pub:video'));
    assert.ok(lb2.framesDecoded >= lb1.framesDecoded + 8, `loopback video ${lb1.framesDecoded} -> ${lb2.framesDecoded}`);

    // No errors anywhere, and no silent recovery: partytracks would have made
    // new sessions and re-pushed/re-pulled everything after a failure.
    const errors = await inPage(page, () => window.PT.errors);
    assert.deepEqual(errors, []);
    for (const name of ['pub', 'sub']) {
      const sessions = await inPage(page, (n) => window.PT.sessions(n), name);
      assert.equal(sessions.length, 1, `${name} used sessions ${JSON.stringify(sessions)}`);
      const hist = await inPage(page, (n) => window.PT.history(n), name);
      const bad = hist.filter((e) => e.type === 'response' && (e.body?.errorCode || (e.body?.tracks || []).some((t) => t.errorCode)));
      assert.deepEqual(bad, [], `${name}: API errors ${JSON.stringify(bad).slice(0, 500)}`);
    }
    const failed = proxyLog.filter((e) => e.status >= 400);
    assert.deepEqual(failed, []);
    const endpoints = [...new Set(proxyLog.map((e) => `${e.method} ${e.path.replace(/sessions\/[0-9a-f]+/, 'sessions/:id')}`))].sort();
    console.log(`partytracks: proxied ${proxyLog.length} requests: ${endpoints.join(', ')}`);
    for (const ep of ['POST /partytracks/sessions/new', 'POST /partytracks/sessions/:id/tracks/new', 'PUT /partytracks/sessions/:id/renegotiate', 'PUT /partytracks/sessions/:id/tracks/close']) {
      assert.ok(endpoints.includes(ep), `never called ${ep}`);
    }
  });
});
