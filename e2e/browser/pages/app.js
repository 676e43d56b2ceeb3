// Page glue: exposes `window.P`, a small keyed facade over calls-client.js that
// the Node tests drive with page.evaluate(). The API location and credentials
// come from the query string: ?api=<base>&app=<appId>&secret=<secret>.
import { CallsApi, CallsSession, apiLog } from './calls-client.js';

const q = new URLSearchParams(location.search);
const api = new CallsApi({ apiBase: q.get('api'), appId: q.get('app'), secret: q.get('secret') });
const sessions = {};
const media = {};

function sess(key) {
  const s = sessions[key];
  if (!s) throw new Error(`no session ${key}`);
  return s;
}

function tracksOf(mediaKey) {
  const m = media[mediaKey];
  if (!m) throw new Error(`no media ${mediaKey}`);
  // audio first, then video: one tracks/new carries both.
  return [...m.getAudioTracks(), ...m.getVideoTracks()];
}

// applyConstraints on a clone of a shared fake-camera track occasionally
// resolves with the old size in place (seen about once in 25 opens while other
// tabs use the same source); check and re-apply until the settings agree.
async function scaleTo(track, size, attempts = 5) {
  for (let i = 0; i < attempts; i++) {
    await track.applyConstraints({ width: { exact: size.width }, height: { exact: size.height } });
    for (let j = 0; j < 10; j++) {
      if (track.getSettings().width === size.width) return;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`fake camera: could not scale to ${size.width}x${size.height}: ${JSON.stringify(track.getSettings())}`);
}

window.P = {
  apiLog,
  sessions,
  // Fake camera + microphone. `width`/`height` give each participant its own
  // video size, so that a receiver can tell whose video it decodes (a mis-routing
  // SFU would show up as the wrong frameWidth). contentHint 'detail' keeps the
  // encoder from scaling the resolution down under CPU load.
  // The fake camera is one source shared by all tabs, and Chromium reconfigures
  // its native format to suit the tracks using it. So open it at exactly 640x480,
  // keep that track alive (unsent) to pin the format, and send a scaled clone.
  async getMedia(key = 'cam', size) {
    const raw = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: { exact: 640 }, height: { exact: 480 } } });
    const [audio] = raw.getAudioTracks();
    const [pin] = raw.getVideoTracks();
    const video = pin.clone();
    if (size) await scaleTo(video, size);
    video.contentHint = 'detail';
    media[key] = new MediaStream([audio, video]);
    media[key].pin = pin;
    return media[key].getTracks().map((t) => ({ kind: t.kind, settings: t.getSettings() }));
  },
  stopMedia(key = 'cam') {
    media[key]?.getTracks().forEach((t) => t.stop());
    media[key]?.pin?.stop();
    delete media[key];
  },
  async newSession(key, label = key) {
    sessions[key] = await CallsSession.create(api, label);
    return sessions[key].sessionId;
  },
  push: (key, mediaKey = 'cam', namePrefix) => sess(key).push(tracksOf(mediaKey), namePrefix ?? key),
  // Video only, in simulcast layers `sendEncodings`.
  pushSimulcast: (key, sendEncodings, mediaKey = 'cam') =>
    sess(key).push(tracksOf(mediaKey).filter((t) => t.kind === 'video'), key, { sendEncodings }),
  update: (key, mid, simulcast) => sess(key).update(mid, simulcast),
  pull: (key, remotes) => sess(key).pull(remotes),
  close: (key, mids) => sess(key).close(mids),
  forceClose: (key, mids) => sess(key).forceClose(mids),
  state: (key) => sess(key).state(),
  waitIce: (key, ms = 5000) => sess(key).waitIceConnected(ms),
  waitMedia: (key, mids, opts) => sess(key).waitMedia(mids, opts),
  inbound: (key) => sess(key).inbound(),
  outbound: (key) => sess(key).outbound(),
  startMonitor: (key) => sess(key).startMonitor(),
  monitorReport: (key) => sess(key).monitorReport(),
  closePc(key) {
    sess(key).closePc();
  },
  debug() {
    return {
      url: location.href,
      sessions: Object.fromEntries(Object.entries(sessions).map(([k, s]) => [k, s.debug()])),
      apiLog,
    };
  },

  // The echo flow of Cloudflare's official demo, run entirely in the page:
  // session A pushes camera + microphone (sendonly, one tracks/new with both),
  // waits for ICE (the demo gives it 5 s), session B on a second PC pulls both
  // (tracks/new remote -> SFU offer -> answer -> renegotiate). Returns timings;
  // Throws unless B decodes video and receives audio within 5 s of the answer.
  async echo() {
    const t = {};
    const t0 = performance.now();
    const mark = (k) => { t[k] = Math.round(performance.now() - t0); };
    const [a, b] = await Promise.all([CallsSession.create(api, 'echo-A'), CallsSession.create(api, 'echo-B')]);
    sessions.A = a;
    sessions.B = b;
    mark('sessions');
    media.cam = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    mark('getUserMedia');
    const pushed = await a.push(tracksOf('cam'), 'echo');
    mark('pushAnswerApplied');
    await a.waitIceConnected(5000);
    mark('pushIceConnected');
    const pulled = await b.pull(pushed.map((p) => ({ sessionId: p.sessionId, trackName: p.trackName, kind: p.kind })));
    t.pullAnswerApplied = Math.round(pulled.appliedAt - t0);
    // Media must arrive within 5 s of applying B's answer.
    const budget = 5000 - (performance.now() - pulled.appliedAt);
    const got = await b.waitMedia(pulled.tracks.map((x) => x.mid), { timeoutMs: budget });
    t.firstMediaAfterAnswer = Math.round(performance.now() - pulled.appliedAt);
    mark('firstMedia');
    return { timings: t, pushed, pulled: pulled.tracks, stats: got.stats };
  },
};
window.P.ready = true;
