// A small Calls client for the demo pages: one CallsSession = one Calls session = one
// RTCPeerConnection. Requests go to this server's demo backend (/demo/api/calls/...), which
// adds the app secret; the browser never holds it.

export async function api(method, path, body) {
  const res = await fetch('/demo/api/calls/' + path, {
    method,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok || json.errorCode) {
    throw new Error(`${method} ${path}: ${res.status} ${json.errorCode}: ${json.errorDescription}`);
  }
  return json;
}

export class CallsSession {
  static async create() {
    const { sessionId } = await api('POST', 'sessions/new');
    return new CallsSession(sessionId);
  }

  constructor(id) {
    this.id = id;
    this.pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    this.queue = Promise.resolve();
  }

  // Calls requires one negotiation at a time per session.
  serialize(fn) {
    const p = this.queue.then(fn);
    this.queue = p.catch(() => {});
    return p;
  }

  // Publishes tracks; resolves to [{trackName, mid, kind}].
  push(tracks) {
    return this.serialize(async () => {
      const trs = tracks.map((t) => this.pc.addTransceiver(t, { direction: 'sendonly' }));
      await this.pc.setLocalDescription(await this.pc.createOffer());
      const items = trs.map((tr, i) => ({
        location: 'local', mid: tr.mid, trackName: crypto.randomUUID(), kind: tracks[i].kind,
      }));
      const res = await api('POST', `sessions/${this.id}/tracks/new`, {
        sessionDescription: { type: 'offer', sdp: this.pc.localDescription.sdp },
        tracks: items.map(({ location, mid, trackName }) => ({ location, mid, trackName })),
      });
      await this.pc.setRemoteDescription(res.sessionDescription);
      return items.map(({ trackName, mid, kind }) => ({ trackName, mid, kind }));
    });
  }

  // Pulls remote tracks [{sessionId, trackName}]; resolves to [{mid, track, ...}].
  pull(remote) {
    return this.serialize(async () => {
      const res = await api('POST', `sessions/${this.id}/tracks/new`, {
        tracks: remote.map((r) => ({ location: 'remote', sessionId: r.sessionId, trackName: r.trackName })),
      });
      if (res.requiresImmediateRenegotiation) {
        await this.pc.setRemoteDescription(res.sessionDescription);
        await this.pc.setLocalDescription(await this.pc.createAnswer());
        await api('PUT', `sessions/${this.id}/renegotiate`, {
          sessionDescription: { type: 'answer', sdp: this.pc.localDescription.sdp },
        });
      }
      return res.tracks.map((t) => {
        const tr = this.pc.getTransceivers().find((x) => x.mid === t.mid);
        return { ...t, track: tr && tr.receiver.track };
      });
    });
  }

  // Negotiated close of our m-lines (published or pulled).
  close(mids) {
    return this.serialize(async () => {
      if (!mids.length) return;
      for (const tr of this.pc.getTransceivers()) if (mids.includes(tr.mid)) tr.stop();
      await this.pc.setLocalDescription(await this.pc.createOffer());
      const res = await api('PUT', `sessions/${this.id}/tracks/close`, {
        tracks: mids.map((mid) => ({ mid })),
        sessionDescription: { type: 'offer', sdp: this.pc.localDescription.sdp },
        force: false,
      });
      await this.pc.setRemoteDescription(res.sessionDescription);
    });
  }

  // Inbound video/audio stats by mid: {mid: {kind, framesDecoded, packetsReceived, bytesReceived}}.
  async inbound() {
    const out = {};
    (await this.pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') {
        out[s.mid] = {
          kind: s.kind, framesDecoded: s.framesDecoded || 0,
          packetsReceived: s.packetsReceived || 0, bytesReceived: s.bytesReceived || 0,
        };
      }
    });
    return out;
  }

  async rttMs() {
    let rtt = null;
    (await this.pc.getStats()).forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated && s.currentRoundTripTime !== undefined) {
        rtt = s.currentRoundTripTime * 1000;
      }
    });
    return rtt;
  }
}
