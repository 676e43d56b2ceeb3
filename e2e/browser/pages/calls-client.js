// Browser-side Calls API client used by the e2e pages.
//
// It talks to the opencalls HTTP API straight from the page, the way Cloudflare's
// official echo demo does: `fetch` with a JSON *string* body and only an
// Authorization header (so the body goes out as text/plain and the request is
// cross-origin, which needs CORS), and it never waits for ICE gathering before
// sending an offer (offers carry no candidates; the SFU is ICE-lite).
//
// Every HTTP exchange and every SDP is recorded in `apiLog` so that a failing test
// can dump the full evidence.

export const apiLog = [];

export class ApiError extends Error {
  constructor(message, details) {
    super(message);
    this.name = 'ApiError';
    this.details = details;
  }
}

export class CallsApi {
  constructor({ apiBase, appId, secret }) {
    this.apiBase = apiBase.replace(/\/$/, '');
    this.appId = appId;
    this.secret = secret;
  }

  // One HTTP call. `body` (an object) is sent as a JSON string with no
  // Content-Type header of our own, exactly like the official demos do.
  async call(method, path, body, label = '') {
    const url = `${this.apiBase}/apps/${this.appId}/${path}`;
    const init = { method, headers: { Authorization: `Bearer ${this.secret}` } };
    if (body !== undefined) init.body = JSON.stringify(body);
    const t0 = performance.now();
    const entry = { label, method, url, request: body, at: new Date().toISOString() };
    apiLog.push(entry);
    let res;
    try {
      res = await fetch(url, init);
    } catch (e) {
      entry.networkError = String(e);
      throw new ApiError(`${method} ${path}: network error ${e}`, entry);
    }
    const text = await res.text();
    entry.status = res.status;
    entry.ms = Math.round(performance.now() - t0);
    entry.acao = res.headers.get('access-control-allow-origin');
    try {
      entry.response = JSON.parse(text);
    } catch {
      entry.response = text;
      throw new ApiError(`${method} ${path}: HTTP ${res.status}, body is not JSON: ${JSON.stringify(text).slice(0, 300)}`, entry);
    }
    if (!res.ok || entry.response?.errorCode) {
      throw new ApiError(`${method} ${path}: HTTP ${res.status} ${JSON.stringify(entry.response).slice(0, 500)}`, entry);
    }
    return entry.response;
  }

  newSession(label) {
    return this.call('POST', 'sessions/new', undefined, label);
  }
}

function itemErrors(tracks) {
  return (tracks || []).filter((t) => t.errorCode);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function randomId() {
  return crypto.randomUUID();
}

// One Calls session = one RTCPeerConnection. Push (client offer), pull (SFU offer +
// renegotiate) and close (client offer) all go through a per-session FIFO, because
// a session has a single offer/answer state machine.
export class CallsSession {
  constructor(api, label) {
    this.api = api;
    this.label = label;
    this.sessionId = null;
    this.pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    this.queue = Promise.resolve();
    this.pushed = new Map(); // mid -> {trackName, kind}
    this.pulled = new Map(); // mid -> {sessionId, trackName, kind}
    this.trackEvents = new Map(); // mid -> ms timestamp of the `track` event
    this.events = [];
    const t0 = performance.now();
    this.t0 = t0;
    const ev = (what) => this.events.push({ t: Math.round(performance.now() - t0), what });
    this.pc.addEventListener('track', (e) => {
      const mid = e.transceiver.mid;
      this.trackEvents.set(mid, performance.now());
      ev(`track mid=${mid} kind=${e.track.kind}`);
    });
    this.pc.addEventListener('iceconnectionstatechange', () => ev(`ice=${this.pc.iceConnectionState}`));
    this.pc.addEventListener('connectionstatechange', () => ev(`conn=${this.pc.connectionState}`));
    this.pc.addEventListener('signalingstatechange', () => ev(`signaling=${this.pc.signalingState}`));
  }

  static async create(api, label) {
    const s = new CallsSession(api, label);
    const r = await api.newSession(`${label} sessions/new`);
    if (typeof r.sessionId !== 'string' || !r.sessionId) throw new ApiError('sessions/new returned no sessionId', r);
    s.sessionId = r.sessionId;
    return s;
  }

  serial(fn) {
    const p = this.queue.then(fn);
    this.queue = p.catch(() => {});
    return p;
  }

  path(rest) {
    return `sessions/${this.sessionId}/${rest}`;
  }

  // Push: sendonly transceivers for every track, createOffer, setLocalDescription,
  // POST tracks/new with the offer right away (no waiting for ICE gathering).
  // `sendEncodings` (video only): simulcast layers, e.g. [{rid: 'h'}, {rid: 'l', ...}].
  push(tracks, namePrefix = this.label, { sendEncodings } = {}) {
    return this.serial(async () => {
      const trs = tracks.map((t) => this.pc.addTransceiver(t, {
        direction: 'sendonly',
        ...(sendEncodings && t.kind === 'video' ? { sendEncodings } : {}),
      }));
      await this.pc.setLocalDescription(await this.pc.createOffer());
      const wanted = trs.map((tr, i) => ({
        location: 'local',
        mid: tr.mid,
        trackName: `${namePrefix}-${tracks[i].kind}-${randomId()}`,
      }));
      const resp = await this.api.call('POST', this.path('tracks/new'), {
        sessionDescription: { type: 'offer', sdp: this.pc.localDescription.sdp },
        tracks: wanted,
      }, `${this.label} push`);
      if (itemErrors(resp.tracks).length) throw new ApiError(`push: item errors ${JSON.stringify(itemErrors(resp.tracks))}`, resp);
      if (resp.sessionDescription?.type !== 'answer') throw new ApiError('push: response has no answer', resp);
      if (resp.requiresImmediateRenegotiation) throw new ApiError('push: requiresImmediateRenegotiation is true', resp);
      for (const w of wanted) {
        const r = (resp.tracks || []).find((t) => t.mid === w.mid);
        if (!r || r.trackName !== w.trackName) throw new ApiError(`push: no result echoing mid ${w.mid} / ${w.trackName}`, resp);
      }
      await this.pc.setRemoteDescription(resp.sessionDescription);
      const out = wanted.map((w, i) => ({ mid: w.mid, trackName: w.trackName, kind: tracks[i].kind, sessionId: this.sessionId }));
      out.forEach((o) => this.pushed.set(o.mid, o));
      return out;
    });
  }

  // Pull: POST tracks/new (remote, no SDP) -> SFU offer; setRemoteDescription,
  // createAnswer, setLocalDescription, PUT renegotiate.
  pull(remotes) {
    return this.serial(async () => {
      const resp = await this.api.call('POST', this.path('tracks/new'), {
        tracks: remotes.map((r) => ({
          location: 'remote',
          sessionId: r.sessionId,
          trackName: r.trackName,
          ...(r.simulcast ? { simulcast: r.simulcast } : {}),
        })),
      }, `${this.label} pull`);
      if (itemErrors(resp.tracks).length) throw new ApiError(`pull: item errors ${JSON.stringify(itemErrors(resp.tracks))}`, resp);
      if (resp.requiresImmediateRenegotiation !== true) throw new ApiError('pull: requiresImmediateRenegotiation is not true', resp);
      if (resp.sessionDescription?.type !== 'offer') throw new ApiError('pull: response has no SFU offer', resp);
      const out = remotes.map((r) => {
        const t = (resp.tracks || []).find((x) => x.trackName === r.trackName && x.sessionId === r.sessionId);
        if (!t || typeof t.mid !== 'string' || !t.mid) throw new ApiError(`pull: no result with mid for ${r.sessionId}/${r.trackName}`, resp);
        return { mid: t.mid, sessionId: r.sessionId, trackName: r.trackName, kind: r.kind };
      });
      await this.pc.setRemoteDescription(resp.sessionDescription);
      await this.pc.setLocalDescription(await this.pc.createAnswer());
      await this.api.call('PUT', this.path('renegotiate'), {
        sessionDescription: { type: 'answer', sdp: this.pc.localDescription.sdp },
      }, `${this.label} renegotiate`);
      const appliedAt = performance.now();
      for (const o of out) {
        const tr = this.pc.getTransceivers().find((t) => t.mid === o.mid);
        if (!tr) throw new ApiError(`pull: SFU offer has no m-line with mid ${o.mid}`, resp);
        if (o.kind && tr.receiver.track.kind !== o.kind) throw new ApiError(`pull: mid ${o.mid} is ${tr.receiver.track.kind}, expected ${o.kind}`, resp);
        o.kind = tr.receiver.track.kind;
        this.pulled.set(o.mid, o);
      }
      return { tracks: out, appliedAt };
    });
  }

  // tracks/update: another simulcast layer for pulled m-line `mid` (no SDP).
  update(mid, simulcast) {
    return this.serial(async () => {
      const resp = await this.api.call('PUT', this.path('tracks/update'), {
        tracks: [{ location: 'remote', mid, simulcast }],
      }, `${this.label} update`);
      if (itemErrors(resp.tracks).length) throw new ApiError(`update: item errors ${JSON.stringify(itemErrors(resp.tracks))}`, resp);
      return resp;
    });
  }

  // Negotiated close: transceiver.stop(), createOffer, setLocalDescription,
  // PUT tracks/close {force:false} with that offer, apply the SFU answer.
  // Per-item close_track_error ("Track doesn't exist or was already closed") is
  // treated as success, as the Calls docs tell clients to; any other item error
  // throws. The answer is required either way.
  // (Chromium cannot do this for the last live m-lines of a max-bundle PC: the
  // offer then has no BUNDLE group and setLocalDescription fails. Use forceClose.)
  close(mids) {
    return this.serial(async () => {
      for (const mid of mids) {
        const tr = this.pc.getTransceivers().find((t) => t.mid === mid);
        if (!tr) throw new Error(`close: no transceiver with mid ${mid}`);
        tr.stop();
      }
      await this.pc.setLocalDescription(await this.pc.createOffer());
      const resp = await this.api.call('PUT', this.path('tracks/close'), {
        tracks: mids.map((mid) => ({ mid })),
        sessionDescription: { type: 'offer', sdp: this.pc.localDescription.sdp },
        force: false,
      }, `${this.label} close`);
      const bad = itemErrors(resp.tracks).filter((t) => t.errorCode !== 'close_track_error');
      if (bad.length) throw new ApiError(`close: item errors ${JSON.stringify(bad)}`, resp);
      if (resp.sessionDescription?.type !== 'answer') throw new ApiError('close: response has no answer', resp);
      await this.pc.setRemoteDescription(resp.sessionDescription);
      for (const mid of mids) {
        this.pulled.delete(mid);
        this.pushed.delete(mid);
      }
      return { alreadyClosed: itemErrors(resp.tracks).map((t) => t.mid), requiresImmediateRenegotiation: resp.requiresImmediateRenegotiation };
    });
  }

  // Close without SDP (force:true): the SFU just stops; the m-lines stay.
  forceClose(mids) {
    return this.serial(async () => {
      const resp = await this.api.call('PUT', this.path('tracks/close'), { tracks: mids.map((mid) => ({ mid })), force: true }, `${this.label} force-close`);
      const bad = itemErrors(resp.tracks).filter((t) => t.errorCode !== 'close_track_error');
      if (bad.length) throw new ApiError(`force close: item errors ${JSON.stringify(bad)}`, resp);
      if (resp.requiresImmediateRenegotiation) throw new ApiError('force close: requiresImmediateRenegotiation is true', resp);
      for (const mid of mids) {
        this.pulled.delete(mid);
        this.pushed.delete(mid);
      }
      return { alreadyClosed: itemErrors(resp.tracks).map((t) => t.mid) };
    });
  }

  state() {
    return this.api.call('GET', `sessions/${this.sessionId}`, undefined, `${this.label} get`);
  }

  waitIceConnected(timeoutMs) {
    const pc = this.pc;
    const ok = () => pc.iceConnectionState === 'connected' || pc.iceConnectionState === 'completed';
    if (ok()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`ICE not connected after ${timeoutMs} ms (state ${pc.iceConnectionState}, connectionState ${pc.connectionState})`)), timeoutMs);
      const h = () => {
        if (ok()) { clearTimeout(t); pc.removeEventListener('iceconnectionstatechange', h); resolve(); }
      };
      pc.addEventListener('iceconnectionstatechange', h);
    });
  }

  // Inbound stats per pulled mid (receiver.getStats(), so the mapping is exact).
  async inbound() {
    const out = {};
    for (const tr of this.pc.getTransceivers()) {
      if (!tr.mid || !this.pulled.has(tr.mid) || tr.stopped) continue;
      const info = this.pulled.get(tr.mid);
      const st = { mid: tr.mid, kind: tr.receiver.track.kind, trackName: info.trackName, sessionId: info.sessionId,
        framesDecoded: 0, packetsReceived: 0, bytesReceived: 0, frameWidth: 0, totalSamplesReceived: 0,
        packetsLost: 0, nackCount: 0, retransmittedPacketsReceived: 0, freezeCount: 0, pliCount: 0,
        senderReports: 0, senderReportTime: 0 };
      (await tr.receiver.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp') {
          st.framesDecoded = s.framesDecoded ?? 0;
          st.packetsReceived = s.packetsReceived ?? 0;
          st.bytesReceived = s.bytesReceived ?? 0;
          st.frameWidth = s.frameWidth ?? 0;
          st.totalSamplesReceived = s.totalSamplesReceived ?? 0;
          st.packetsLost = s.packetsLost ?? 0;
          st.nackCount = s.nackCount ?? 0;
          st.retransmittedPacketsReceived = s.retransmittedPacketsReceived ?? 0;
          st.freezeCount = s.freezeCount ?? 0;
          st.pliCount = s.pliCount ?? 0;
          st.codec = s.codecId;
        } else if (s.type === 'remote-outbound-rtp') {
          // What the SFU's sender reports said (the RTP time <-> wall clock mapping
          // receivers use for A/V sync).
          st.senderReports = s.reportsSent ?? 0;
          st.senderReportTime = s.remoteTimestamp ?? 0;
        }
      });
      out[tr.mid] = st;
    }
    return out;
  }

  async outbound() {
    const out = {};
    for (const tr of this.pc.getTransceivers()) {
      if (!tr.mid || !this.pushed.has(tr.mid) || tr.stopped) continue;
      const st = { mid: tr.mid, kind: tr.sender.track?.kind, packetsSent: 0, bytesSent: 0, framesEncoded: 0,
        nackCount: 0, retransmittedPacketsSent: 0 };
      (await tr.sender.getStats()).forEach((s) => {
        if (s.type === 'outbound-rtp') {
          st.packetsSent = s.packetsSent ?? 0;
          st.bytesSent = s.bytesSent ?? 0;
          st.framesEncoded = s.framesEncoded ?? 0;
          st.nackCount = s.nackCount ?? 0;
          st.retransmittedPacketsSent = s.retransmittedPacketsSent ?? 0;
        }
      });
      out[tr.mid] = st;
    }
    return out;
  }

  // Resolves once every pulled mid in `mids` has media: video framesDecoded >=
  // minFrames (and, if `widths[mid]` is given, frameWidth equal to it), audio
  // packetsReceived >= minPackets. Rejects after timeoutMs with the last stats
  // snapshot in the message.
  async waitMedia(mids, { timeoutMs = 5000, minFrames = 1, minPackets = 1, widths = {} } = {}) {
    const t0 = performance.now();
    let last = {};
    for (;;) {
      last = await this.inbound();
      const missing = mids.filter((mid) => {
        const s = last[mid];
        if (!s) return true;
        if (s.kind === 'video') return s.framesDecoded < minFrames || (widths[mid] && s.frameWidth !== widths[mid]);
        return s.packetsReceived < minPackets;
      });
      if (!missing.length) return { ms: Math.round(performance.now() - t0), stats: last };
      if (performance.now() - t0 > timeoutMs) {
        throw new Error(`${this.label}: no media within ${timeoutMs} ms on mids ${JSON.stringify(missing)}; ` +
          `ice=${this.pc.iceConnectionState} conn=${this.pc.connectionState}; stats=${JSON.stringify(last)}`);
      }
      await sleep(100);
    }
  }

  // Continuous monitor: samples inbound stats every `everyMs` and tracks, per mid,
  // the longest time the counter (video framesDecoded / audio packetsReceived)
  // did not increase. Used to prove that unaffected streams keep flowing while
  // other tracks are closed, participants leave, and rejoin.
  startMonitor(everyMs = 200) {
    this.stopMonitor();
    const mon = { started: performance.now(), per: {} };
    this.monitor = mon;
    const tick = async () => {
      const now = performance.now();
      let st;
      try { st = await this.inbound(); } catch { st = {}; }
      for (const [mid, s] of Object.entries(st)) {
        const v = s.kind === 'video' ? s.framesDecoded : s.packetsReceived;
        const p = mon.per[mid];
        if (!p) {
          mon.per[mid] = { kind: s.kind, trackName: s.trackName, first: v, value: v, lastIncrease: now, maxStallMs: 0, since: now };
          continue;
        }
        if (v > p.value) { p.value = v; p.lastIncrease = now; }
        p.maxStallMs = Math.max(p.maxStallMs, now - p.lastIncrease);
      }
      if (this.monitor === mon) mon.timer = setTimeout(tick, everyMs);
    };
    tick();
  }

  stopMonitor() {
    if (this.monitor?.timer) clearTimeout(this.monitor.timer);
    const m = this.monitor;
    this.monitor = null;
    return m;
  }

  // Report and restart the windows: {mid: {kind, trackName, increase, maxStallMs, windowMs}}
  monitorReport(reset = true) {
    const mon = this.monitor;
    if (!mon) return {};
    const now = performance.now();
    const out = {};
    for (const [mid, p] of Object.entries(mon.per)) {
      out[mid] = { kind: p.kind, trackName: p.trackName, increase: p.value - p.first,
        maxStallMs: Math.round(Math.max(p.maxStallMs, now - p.lastIncrease)), windowMs: Math.round(now - p.since) };
      if (reset) { p.first = p.value; p.maxStallMs = 0; p.lastIncrease = now; p.since = now; }
    }
    return out;
  }

  closePc() {
    this.stopMonitor();
    this.pc.close();
  }

  debug() {
    return {
      label: this.label,
      sessionId: this.sessionId,
      signalingState: this.pc.signalingState,
      iceConnectionState: this.pc.iceConnectionState,
      connectionState: this.pc.connectionState,
      localDescription: this.pc.localDescription?.sdp,
      remoteDescription: this.pc.remoteDescription?.sdp,
      transceivers: this.pc.getTransceivers().map((t) => ({ mid: t.mid, direction: t.direction, currentDirection: t.currentDirection, stopped: t.stopped, kind: t.receiver.track.kind })),
      events: this.events,
    };
  }
}
