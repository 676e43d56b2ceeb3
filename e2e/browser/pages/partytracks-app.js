// Our own small page around partytracks 0.0.54 (npm), the official Calls client
// library. Bundled by esbuild at test time and served next to a /partytracks/*
// proxy that forwards to opencalls (see partytracks.test.mjs).
//
// Exposes window.PT for the Node test: named PartyTracks instances (one
// RTCPeerConnection + one Calls session each), push() of fake camera/mic
// tracks, pull() of track metadata, unpull() (partytracks then does the
// negotiated tracks/close), and receiver stats per pulled track.
import { PartyTracks } from 'partytracks/client';
import { of, firstValueFrom } from 'rxjs';

const instances = {};
const pushed = {}; // key -> {meta, sub}
const pulled = {}; // key -> {track, sub, meta}
const errors = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function inst(name) {
  const pt = instances[name];
  if (!pt) throw new Error(`no PartyTracks instance ${name}`);
  return pt;
}

// First value of an observable that we keep subscribed (so the track stays
// pushed/pulled until we unsubscribe), with a time limit.
function keepSubscribed(obs$, what, timeoutMs = 15000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what}: nothing within ${timeoutMs} ms`)), timeoutMs);
    let first = true;
    const sub = obs$.subscribe({
      next: (v) => {
        if (first) { first = false; clearTimeout(t); resolve({ value: v, sub }); }
      },
      error: (e) => { errors.push(`${what}: ${e?.message || e}`); clearTimeout(t); reject(e); },
    });
  });
}

window.PT = {
  errors,
  create(name) {
    // iceServers: [] so that the library neither fetches generate-ice-servers
    // nor contacts any STUN server: everything stays on 127.0.0.1.
    const pt = new PartyTracks({ prefix: '/partytracks', iceServers: [] });
    instances[name] = pt;
    pt.sessionError$.subscribe((e) => errors.push(`${name} sessionError: ${e}`));
    const sessions = [];
    pt.session$.subscribe({ next: ({ sessionId }) => sessions.push(sessionId), error: (e) => errors.push(`${name} session$: ${e}`) });
    pt.__sessions = sessions;
  },
  // Pushes fake camera + microphone; resolves with the published metadata
  // (partytracks emits it once outbound-rtp bytesSent > 0).
  async push(name, size) {
    const pt = inst(name);
    const raw = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: { exact: 640 }, height: { exact: 480 } } });
    const [audio] = raw.getAudioTracks();
    const [pin] = raw.getVideoTracks();
    const video = pin.clone();
    if (size) {
      // Re-apply until the settings agree (see scaleTo in app.js).
      for (let i = 0; i < 50 && video.getSettings().width !== size.width; i++) {
        if (i % 10 === 0) await video.applyConstraints({ width: { exact: size.width }, height: { exact: size.height } });
        else await sleep(50);
      }
    }
    video.contentHint = 'detail';
    const out = {};
    await Promise.all([['audio', audio], ['video', video]].map(async ([kind, track]) => {
      const { value, sub } = await keepSubscribed(pt.push(of(track)), `${name} push ${kind}`);
      pushed[`${name}:${kind}`] = { meta: value, sub, pin };
      out[kind] = value;
    }));
    return out;
  },
  async pull(name, key, meta) {
    const pt = inst(name);
    const { value: track, sub } = await keepSubscribed(pt.pull(of(meta)), `${name} pull ${key}`);
    pulled[key] = { track, sub, meta, name };
    return { kind: track.kind, id: track.id };
  },
  // Unsubscribing makes partytracks close the pulled track (stop, offer,
  // PUT tracks/close force:false, apply answer). Resolves once that request
  // has been answered.
  async unpull(key) {
    const p = pulled[key];
    const pt = inst(p.name);
    const before = pt.history.entries.length;
    p.sub.unsubscribe();
    delete pulled[key];
    for (let i = 0; i < 100; i++) {
      const e = pt.history.entries.slice(before).find((x) => x.type === 'response' && /\/tracks\/close/.test(x.endpoint));
      if (e) {
        const pc = await firstValueFrom(pt.peerConnection$);
        for (let j = 0; j < 50 && pc.signalingState !== 'stable'; j++) await sleep(100);
        return { response: e.body, signalingState: pc.signalingState };
      }
      await sleep(100);
    }
    throw new Error(`unpull ${key}: no tracks/close response within 10 s`);
  },
  async stats(key) {
    const p = pulled[key];
    const pc = await firstValueFrom(inst(p.name).peerConnection$);
    const tr = pc.getTransceivers().find((t) => t.receiver.track === p.track);
    if (!tr) return null;
    const st = { mid: tr.mid, kind: p.track.kind, framesDecoded: 0, packetsReceived: 0, frameWidth: 0 };
    (await tr.receiver.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') {
        st.framesDecoded = s.framesDecoded ?? 0;
        st.packetsReceived = s.packetsReceived ?? 0;
        st.frameWidth = s.frameWidth ?? 0;
      }
    });
    return st;
  },
  // Waits until the pulled track `key` has media (video: framesDecoded >=
  // minFrames and, if given, frameWidth === width; audio: packets).
  async waitMedia(key, { timeoutMs = 5000, minFrames = 1, width } = {}) {
    const t0 = performance.now();
    let st = null;
    for (;;) {
      st = await window.PT.stats(key);
      if (st && (st.kind === 'video' ? st.framesDecoded >= minFrames && (!width || st.frameWidth === width) : st.packetsReceived > 0)) {
        return { ms: Math.round(performance.now() - t0), ...st };
      }
      if (performance.now() - t0 > timeoutMs) throw new Error(`${key}: no media within ${timeoutMs} ms: ${JSON.stringify(st)}`);
      await sleep(100);
    }
  },
  sessions: (name) => inst(name).__sessions,
  history: (name) => inst(name).history.entries,
  async pcInfo(name) {
    const pc = await firstValueFrom(inst(name).peerConnection$);
    return {
      connectionState: pc.connectionState,
      signalingState: pc.signalingState,
      transceivers: pc.getTransceivers().map((t) => ({ mid: t.mid, direction: t.direction, currentDirection: t.currentDirection, stopped: t.stopped })),
      localDescription: pc.localDescription?.sdp,
      remoteDescription: pc.remoteDescription?.sdp,
    };
  },
  // Evidence for a failing test.
  async debug() {
    const out = { errors, instances: {} };
    for (const name of Object.keys(instances)) {
      out.instances[name] = { sessions: instances[name].__sessions, history: instances[name].history.entries };
      try { out.instances[name].pc = await Promise.race([window.PT.pcInfo(name), sleep(1000).then(() => 'timeout')]); } catch (e) { out.instances[name].pc = String(e); }
    }
    return out;
  },
};
// The harness waits for window.P.ready and calls window.P.debug() on failure.
window.P = { ready: true, debug: () => window.PT.debug() };
