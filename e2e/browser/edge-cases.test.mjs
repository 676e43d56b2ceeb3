// Edge cases real browser clients run into.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { suite, inPage } from './lib/harness.mjs';
import { Participant, assertFlowing } from './lib/room.mjs';

const S = suite('edge-cases');
afterEach(() => S.closePages());

// A session pulls a track it already pulls (two views of one participant, or a
// partytracks app whose components pull the same metadata twice). Acceptable
// answers: a per-item error and no renegotiation, or an SFU offer Chromium
// accepts with media on both mids. Either way the first pull must keep working.
test('pulling a track that the session already pulls', { timeout: 60000 }, async () => {
  await S.evidence('pull-same-track-twice', async () => {
    const pub = new Participant(S, 'pub', 'split');
    const sub = new Participant(S, 'sub', 'split');
    await pub.join();
    await sub.open();
    await sub.newSessions();
    await sub.pullFrom([pub], ['video']);
    await sub.waitMediaFrom([pub], { timeoutMs: 5000 });

    const video = pub.published.find((t) => t.kind === 'video');
    const r = await sub.eval(async ([k, v]) => {
      const s = window.P.sessions[k];
      const resp = await s.api.call('POST', s.path('tracks/new'), { tracks: [{ location: 'remote', sessionId: v.sessionId, trackName: v.trackName }] }, 'pull again');
      const out = { resp: { ...resp, sessionDescription: resp.sessionDescription ? { type: resp.sessionDescription.type } : undefined } };
      if (resp.sessionDescription?.type === 'offer') {
        try {
          await s.pc.setRemoteDescription(resp.sessionDescription);
          await s.pc.setLocalDescription(await s.pc.createAnswer());
          await s.api.call('PUT', s.path('renegotiate'), { sessionDescription: { type: 'answer', sdp: s.pc.localDescription.sdp } }, 'renegotiate');
          const t = resp.tracks[0];
          s.pulled.set(t.mid, { mid: t.mid, sessionId: v.sessionId, trackName: v.trackName, kind: 'video' });
          out.newMid = t.mid;
        } catch (e) {
          out.browserError = String(e);
          const msids = resp.sessionDescription.sdp.split(/\r?\n/).filter((l) => l.startsWith('a=msid:'));
          out.msidLines = msids;
        }
      }
      return out;
    }, [sub.subKey, video]);
    console.log(`pull twice: ${JSON.stringify(r).slice(0, 600)}`);
    assert.equal(r.browserError, undefined,
      `the SFU offer for the second pull was rejected by Chromium: ${r.browserError}\n` +
      `a=msid lines in that offer:\n${(r.msidLines || []).join('\n')}`);
    if (r.newMid) {
      sub.subs.get(pub.key).push({ mid: r.newMid, kind: 'video', sessionId: video.sessionId, trackName: video.trackName });
      await sub.waitMediaFrom([pub], { timeoutMs: 5000 });
    } else {
      const item = r.resp.tracks?.[0];
      assert.ok(item?.errorCode, `neither an offer nor an item error: ${JSON.stringify(r.resp)}`);
      assert.notEqual(r.resp.requiresImmediateRenegotiation, true);
    }
    await assertFlowing([[sub, pub]]);
  });
});

// On one bidirectional PC: pull someone's audio+video, close the pulled video
// (negotiated; its m-line becomes port 0), then push a second camera. Chromium's
// next offer carries the stopped m-line or recycles its slot for the new
// transceiver with a new mid. The SFU must take that client offer, and the new
// track must be pullable by others.
test('bidirectional session: push after closing a pulled track (stopped / recycled m-line)', { timeout: 60000 }, async () => {
  await S.evidence('push-after-close', async () => {
    const a = new Participant(S, 'ea', 'split');
    const b = new Participant(S, 'eb', 'bidi');
    await a.join();
    await b.open();
    await b.newSessions();
    await b.pullFrom([a]);
    await b.waitMediaFrom([a], { timeoutMs: 5000 });
    await b.unsubscribe(a, ['video']);
    const before = await b.eval((k) => window.P.sessions[k].pc.getTransceivers().map((t) => t.mid), b.subKey);
    await b.publish();
    const after = await b.eval((k) => ({
      mids: window.P.sessions[k].pc.getTransceivers().map((t) => t.mid),
      mlines: window.P.sessions[k].pc.localDescription.sdp.split(/\r?\n/).filter((l) => l.startsWith('m=') || l.startsWith('a=mid:')),
    }), b.subKey);
    console.log(`push after close: transceivers before ${JSON.stringify(before)}, after ${JSON.stringify(after.mids)}; local SDP ${after.mlines.join(' | ')}`);
    await a.pullFrom([b]);
    await a.waitMediaFrom([b], { timeoutMs: 5000 });
    await assertFlowing([[a, b], [b, a, ['audio']]]);
  });
});
