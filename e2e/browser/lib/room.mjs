// A "room" participant for the multi-party tests: one browser tab with a fake
// camera + microphone, talking to the API from the page.
//
// mode 'split': one publish session (pushes) and one subscribe session (pulls),
//               i.e. two RTCPeerConnections, as Cloudflare's video-room example does.
// mode 'bidi':  ONE session / ONE RTCPeerConnection for both: client offers for
//               push and close, SFU offers (+ renegotiate) for pull.
//
// Rooms and presence are the application's job; here Node plays the app server
// and tells each participant whose tracks to pull.
import assert from 'node:assert/strict';
import { inPage, sleep } from './harness.mjs';

// Distinct 4:3 camera sizes, one per participant, so that receivers can check
// they decode the right publisher's video.
export const SIZES = [[640, 480], [480, 360], [320, 240], [160, 120], [400, 300], [240, 180]]
  .map(([width, height]) => ({ width, height }));

export class Participant {
  constructor(S, name, mode, size) {
    assert.ok(mode === 'split' || mode === 'bidi');
    this.S = S;
    this.name = name;
    this.mode = mode;
    this.size = size || SIZES[Participant.count++ % SIZES.length];
    this.generation = 0;
    this.page = null;
    this.published = []; // [{mid, trackName, kind, sessionId}]
    this.subs = new Map(); // publisher key -> [{mid, sessionId, trackName, kind}]
  }

  static count = 0;

  get pubKey() { return this.mode === 'split' ? `pub${this.generation}` : `bidi${this.generation}`; }
  get subKey() { return this.mode === 'split' ? `sub${this.generation}` : `bidi${this.generation}`; }
  get key() { return `${this.name}#${this.generation}`; }

  eval(fn, arg, ms) {
    return inPage(this.page, fn, arg, ms);
  }

  async open() {
    if (!this.page) this.page = await this.S.openPage(this.name);
    const got = await this.eval((size) => window.P.getMedia('cam', size), this.size);
    const v = got.find((t) => t.kind === 'video');
    assert.equal(v.settings.width, this.size.width, `fake camera size ${JSON.stringify(v.settings)}`);
  }

  // New session(s) for this generation (a rejoin bumps the generation).
  async newSessions() {
    if (this.mode === 'split') {
      await this.eval(([p, s, n]) => Promise.all([window.P.newSession(p, `${n}/${p}`), window.P.newSession(s, `${n}/${s}`)]),
        [this.pubKey, this.subKey, this.name]);
    } else {
      await this.eval(([b, n]) => window.P.newSession(b, `${n}/${b}`), [this.pubKey, this.name]);
    }
  }

  // Push camera + mic (one tracks/new), then wait for ICE like the echo demo does
  // before telling anybody about the tracks.
  async publish() {
    this.published = await this.eval(([k, n]) => window.P.push(k, 'cam', n), [this.pubKey, `${this.name}-g${this.generation}`]);
    assert.equal(this.published.length, 2);
    await this.eval((k) => window.P.waitIce(k, 5000), this.pubKey, 10000);
    // Our encoder really sends (partytracks waits for this too).
    await this.eval(async (k) => {
      for (let i = 0; i < 50; i++) {
        const o = await window.P.outbound(k);
        if (Object.values(o).every((s) => s.packetsSent > 0)) return;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error('outbound packetsSent stayed 0');
    }, this.pubKey);
  }

  async join() {
    await this.open();
    await this.newSessions();
    await this.publish();
  }

  // Pull the published tracks (of the given kinds) of `others` in one tracks/new.
  async pullFrom(others, kinds = ['audio', 'video']) {
    const remotes = others.flatMap((o) => o.published.filter((t) => kinds.includes(t.kind))
      .map((t) => ({ sessionId: t.sessionId, trackName: t.trackName, kind: t.kind })));
    const r = await this.eval(([k, rs]) => window.P.pull(k, rs), [this.subKey, remotes]);
    for (const o of others) {
      const got = r.tracks.filter((t) => o.published.some((p) => p.trackName === t.trackName && p.sessionId === t.sessionId));
      this.subs.set(o.key, [...(this.subs.get(o.key) || []), ...got]);
    }
    return r.tracks;
  }

  midsFrom(other) {
    const s = this.subs.get(other.key);
    assert.ok(s && s.length, `${this.name} has not pulled ${other.key}`);
    return s.map((t) => t.mid);
  }

  // Waits until video from each of `others` is decoded at that publisher's own
  // frame width and its audio arrives.
  async waitMediaFrom(others, opts = { timeoutMs: 10000 }) {
    const mids = others.flatMap((o) => this.midsFrom(o));
    const widths = {};
    for (const o of others) for (const t of this.subs.get(o.key)) if (t.kind === 'video') widths[t.mid] = o.size.width;
    return this.eval(([k, m, op]) => window.P.waitMedia(k, m, op), [this.subKey, mids, { ...opts, widths }], (opts.timeoutMs || 5000) + 5000);
  }

  inbound() {
    return this.eval((k) => window.P.inbound(k), this.subKey);
  }

  // Close (negotiated) the pulled tracks of `other` on the subscribe session.
  // Returns the closed tracks; `alreadyClosed` lists mids the SFU answered with
  // close_track_error (tolerated, as the Calls docs say).
  async unsubscribe(other, kinds = ['audio', 'video']) {
    const tracks = this.subs.get(other.key).filter((t) => kinds.includes(t.kind));
    const r = await this.eval(([k, mids]) => window.P.close(k, mids), [this.subKey, tracks.map((t) => t.mid)]);
    const rest = this.subs.get(other.key).filter((t) => !kinds.includes(t.kind));
    if (rest.length) this.subs.set(other.key, rest); else this.subs.delete(other.key);
    tracks.alreadyClosed = r.alreadyClosed;
    return tracks;
  }

  // Leave: close own published tracks, then close the PC(s).
  // bidi: negotiated close (the pulled m-lines keep the BUNDLE group alive).
  // split: the publish PC holds nothing else, and Chromium cannot make an offer
  // with every m-line stopped under max-bundle, so close with force:true.
  async leave() {
    const mids = this.published.map((t) => t.mid);
    if (this.mode === 'bidi') await this.eval(([k, m]) => window.P.close(k, m), [this.pubKey, mids]);
    else await this.eval(([k, m]) => window.P.forceClose(k, m), [this.pubKey, mids]);
    await this.eval(([a, b]) => { window.P.closePc(a); if (b !== a) window.P.closePc(b); }, [this.pubKey, this.subKey]);
    this.published = [];
    this.subs.clear();
  }

  startMonitor() {
    return this.eval((k) => window.P.startMonitor(k), this.subKey);
  }

  monitorReport() {
    return this.eval((k) => window.P.monitorReport(k), this.subKey);
  }
}

// Joins participants one after another, the way a room fills up: the newcomer
// publishes, then pulls everybody already present (one batch), while everybody
// already present pulls the newcomer (in parallel, each on its own session).
export async function fillRoom(people) {
  const present = [];
  for (const p of people) {
    await p.join();
    await Promise.all([
      present.length ? p.pullFrom(present) : null,
      ...present.map((q) => q.pullFrom([p])),
    ]);
    present.push(p);
  }
}

// Everyone decodes video and receives audio from everyone else.
export async function assertEveryoneReceives(people, { timeoutMs = 10000 } = {}) {
  await Promise.all(people.map((p) => p.waitMediaFrom(people.filter((q) => q !== p), { timeoutMs })));
}

// Over `ms`, every stream of `pairs` ([receiver, publisher]) keeps increasing:
// video framesDecoded by >= minFrames, audio packetsReceived by >= minPackets.
export async function assertFlowing(pairs, { ms = 1500, minFrames = 8, minPackets = 25 } = {}) {
  const before = new Map();
  const receivers = [...new Set(pairs.map(([r]) => r))];
  for (const r of receivers) before.set(r, await r.inbound());
  await sleep(ms);
  const problems = [];
  for (const r of receivers) {
    const after = await r.inbound();
    for (const [rr, pub] of pairs) {
      if (rr !== r) continue;
      for (const mid of r.midsFrom(pub)) {
        const b = before.get(r)[mid];
        const a = after[mid];
        if (!a || !b) { problems.push(`${r.name} <- ${pub.name} mid ${mid}: no stats`); continue; }
        const d = a.kind === 'video' ? a.framesDecoded - b.framesDecoded : a.packetsReceived - b.packetsReceived;
        const need = a.kind === 'video' ? minFrames : minPackets;
        if (d < need) problems.push(`${r.name} <- ${pub.name} ${a.kind} mid ${mid}: +${d} in ${ms} ms (need ${need})`);
      }
    }
  }
  assert.deepEqual(problems, [], problems.join('\n'));
}
