// (a) Echo, as in Cloudflare's official echo demo: the page calls the API itself
// (cross-origin fetch, Bearer secret, JSON string body => text/plain), never waits
// for ICE gathering, pushes camera + microphone in session A and pulls both into
// session B on a second RTCPeerConnection. B must decode video and receive audio
// within 5 s of applying its answer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { suite, inPage, apiGet } from './lib/harness.mjs';

const S = suite('echo');

test('echo: browser-direct push A/V in session A, pull into session B, media within 5 s', { timeout: 60000 }, async () => {
  await S.evidence('echo', async () => {
    const page = await S.openPage('echo');
    const r = await inPage(page, () => window.P.echo(), undefined, 30000);
    console.log(`echo timings (ms since start): ${JSON.stringify(r.timings)}`);

    // The push answer echoed both tracks, the pull got one mid per track.
    assert.equal(r.pushed.length, 2);
    assert.deepEqual(r.pushed.map((t) => t.kind).sort(), ['audio', 'video']);
    assert.equal(r.pulled.length, 2);
    assert.ok(r.timings.firstMediaAfterAnswer <= 5000, `media after ${r.timings.firstMediaAfterAnswer} ms`);

    const byKind = Object.fromEntries(Object.values(r.stats).map((s) => [s.kind, s]));
    assert.ok(byKind.video.framesDecoded > 0, `video framesDecoded ${byKind.video.framesDecoded}`);
    assert.ok(byKind.audio.packetsReceived > 0, `audio packetsReceived ${byKind.audio.packetsReceived}`);

    // Media keeps flowing: a second later there is clearly more of it.
    const later = await inPage(page, async (mids) => {
      await new Promise((res) => setTimeout(res, 1500));
      return window.P.inbound('B');
    }, r.pulled.map((t) => t.mid));
    const v = Object.values(later).find((s) => s.kind === 'video');
    const a = Object.values(later).find((s) => s.kind === 'audio');
    assert.ok(v.framesDecoded >= byKind.video.framesDecoded + 10, `video went ${byKind.video.framesDecoded} -> ${v.framesDecoded} in 1.5 s`);
    assert.ok(a.packetsReceived >= byKind.audio.packetsReceived + 30, `audio went ${byKind.audio.packetsReceived} -> ${a.packetsReceived} in 1.5 s`);
    assert.ok(v.frameWidth > 0, 'decoded video has a size');

    // The publisher's bandwidth estimate climbs from Chrome's 300 kbit/s start: its probes
    // and media come back as the SFU's transport-cc feedback (without any it stays at the
    // start value).
    const bwe = await inPage(page, async () => {
      const read = async () => {
        let best = 0;
        (await window.P.sessions.A.pc.getStats()).forEach((s) => {
          if (s.type === 'candidate-pair' && s.availableOutgoingBitrate) best = Math.max(best, s.availableOutgoingBitrate);
        });
        return best;
      };
      const samples = [];
      const until = performance.now() + 10000;
      for (let b = await read(); ; b = await read()) {
        samples.push(Math.round(b / 1000));
        if (b >= 1e6 || performance.now() > until) return { best: b, samples };
        await new Promise((res) => setTimeout(res, 500));
      }
    }, undefined, 20000);
    console.log(`publisher availableOutgoingBitrate (kbit/s): ${bwe.samples.join(' ')}`);
    assert.ok(bwe.best >= 1e6, `publisher's bandwidth estimate stayed at ${Math.round(bwe.best / 1000)} kbit/s`);

    // The SFU's receiver reports reach the publisher: its video has a remote-inbound-rtp
    // with a round-trip time (from the report's LSR/DLSR, echoing the publisher's sender
    // report) and packet counts.
    const reports = await inPage(page, async () => {
      const until = performance.now() + 10000;
      for (;;) {
        let found = null;
        (await window.P.sessions.A.pc.getStats()).forEach((s) => {
          if (s.type === 'remote-inbound-rtp' && s.kind === 'video' && s.roundTripTime !== undefined) found = s;
        });
        if (found || performance.now() > until) {
          return found && { rtt: found.roundTripTime, lost: found.packetsLost, fraction: found.fractionLost, jitter: found.jitter };
        }
        await new Promise((res) => setTimeout(res, 250));
      }
    }, undefined, 20000);
    console.log(`publisher's remote-inbound-rtp (video): ${JSON.stringify(reports)}`);
    assert.ok(reports, 'no remote-inbound-rtp with a round-trip time for the published video');
    assert.ok(reports.rtt >= 0 && reports.rtt < 1, `round-trip time ${reports.rtt} s`);

    // Every call was cross-origin (page and API on different ports) and answered
    // with JSON; had CORS been refused, fetch would have thrown.
    const log = await inPage(page, () => window.P.apiLog);
    const pageOrigin = new URL(page.url()).origin;
    for (const e of log) {
      assert.notEqual(new URL(e.url).origin, pageOrigin);
      assert.ok(e.status >= 200 && e.status < 300, `${e.method} ${e.url}: HTTP ${e.status}`);
    }

    // The API's view of both sessions.
    const sessA = r.pushed[0].sessionId;
    const sa = await apiGet(S, `sessions/${sessA}`);
    assert.equal(sa.status, 200);
    const localNames = (sa.body.tracks || []).filter((t) => t.location === 'local' && t.status === 'active').map((t) => t.trackName).sort();
    assert.deepEqual(localNames, r.pushed.map((t) => t.trackName).sort(), `GET session A: ${JSON.stringify(sa.body)}`);
    const sessB = await inPage(page, () => window.P.sessions.B.sessionId);
    const sb = await apiGet(S, `sessions/${sessB}`);
    const remote = (sb.body.tracks || []).filter((t) => t.location === 'remote' && t.status === 'active');
    assert.equal(remote.length, 2, `GET session B: ${JSON.stringify(sb.body)}`);
    for (const t of remote) assert.equal(t.sessionId, sessA);
  });
});
