// (c) Leave and rejoin. In a room of three:
//  1. a subscriber closes one pulled track with a negotiated tracks/close
//     (transceiver.stop(), createOffer, setLocalDescription, PUT tracks/close
//     force:false with that offer, apply the answer), on a split and on a
//     bidirectional session, then pulls it again;
//  2. a publisher leaves (closes its published tracks the same way, closes its
//     PC(s)), and the others close their subscriptions to it;
//  3. it comes back with new session(s) and new tracks, and everybody pulls it
//     again.
// Throughout, every stream not involved must keep flowing: a monitor in each page
// samples getStats() every 200 ms and records the longest time framesDecoded
// (video) / packetsReceived (audio) did not increase.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { suite, apiGet, sleep } from './lib/harness.mjs';
import { Participant, fillRoom, assertEveryoneReceives, assertFlowing } from './lib/room.mjs';

const S = suite('leave-rejoin');
afterEach(() => S.closePages());

const MAX_STALL_MS = 1500;

// Checks, for each [receiver, publisher, kinds], that the receiver's monitor saw
// those streams increase and never stall longer than MAX_STALL_MS in the window
// since the previous report (the window covers the step just done plus 1 s).
async function assertUnaffected(step, pairs) {
  await sleep(1000); // every window spans at least a second of media
  const reports = new Map();
  for (const [r] of pairs) if (!reports.has(r)) reports.set(r, await r.monitorReport());
  const problems = [];
  let worst = 0;
  for (const [r, pub, kinds = ['audio', 'video']] of pairs) {
    const rep = reports.get(r);
    for (const t of r.subs.get(pub.key)) {
      if (!kinds.includes(t.kind)) continue;
      const m = rep[t.mid];
      if (!m) { problems.push(`${r.name} <- ${pub.name} ${t.kind} mid ${t.mid}: not monitored`); continue; }
      worst = Math.max(worst, m.maxStallMs);
      if (m.increase <= 0 || m.maxStallMs > MAX_STALL_MS) {
        problems.push(`${r.name} <- ${pub.name} ${t.kind} mid ${t.mid}: +${m.increase} over ${m.windowMs} ms, longest stall ${m.maxStallMs} ms`);
      }
    }
  }
  console.log(`[${step}] unaffected streams: ${pairs.length} pairs, longest stall ${worst} ms`);
  assert.deepEqual(problems, [], `${step}: unaffected streams were disturbed:\n${problems.join('\n')}`);
}

async function sessionTracks(p, key) {
  const id = await p.eval((k) => window.P.sessions[k].sessionId, key);
  const r = await apiGet(S, `sessions/${id}`);
  assert.equal(r.status, 200, `GET sessions/${id}: ${JSON.stringify(r)}`);
  return r.body.tracks || [];
}

async function scenario(leaverMode) {
  const A = new Participant(S, 'A', 'split');
  const B = new Participant(S, 'B', 'bidi');
  const C = new Participant(S, 'C', leaverMode); // the one who leaves and rejoins
  const all = [A, B, C];
  await fillRoom(all);
  await assertEveryoneReceives(all);
  await Promise.all(all.map((p) => p.startMonitor()));
  await sleep(600);
  await Promise.all(all.map((p) => p.monitorReport())); // start a clean window

  // 1a. A (split) stops watching B's video; B (bidi) stops watching C's video.
  const closedA = await A.unsubscribe(B, ['video']);
  const closedB = await B.unsubscribe(C, ['video']);
  await sleep(1500);
  await assertUnaffected('subscriber close', [
    [A, B, ['audio']], [A, C], [B, A], [B, C, ['audio']], [C, A], [C, B],
  ]);
  // The closed pulls are gone from the subscribers' sessions (or inactive).
  for (const [p, closed] of [[A, closedA], [B, closedB]]) {
    const tracks = await sessionTracks(p, p.subKey);
    for (const c of closed) {
      const t = tracks.find((x) => x.mid === c.mid && x.location === 'remote');
      assert.ok(!t || t.status === 'inactive', `${p.name}: closed mid ${c.mid} still listed as ${JSON.stringify(t)}`);
    }
  }
  // The transceivers are stopped and the SDP answer was applied.
  const stable = await B.eval((k) => window.P.sessions[k].pc.signalingState, B.subKey);
  assert.equal(stable, 'stable');

  // 1b. Pull the closed tracks again: new mids, video at the right publisher's size.
  await Promise.all([A.pullFrom([B], ['video']), B.pullFrom([C], ['video'])]);
  await Promise.all([A.waitMediaFrom([B], { timeoutMs: 5000 }), B.waitMediaFrom([C], { timeoutMs: 5000 })]);
  await assertUnaffected('pull again', [[A, C], [B, A], [C, A], [C, B]]);

  // 2. C leaves: closes its published tracks (negotiated), closes its PC(s).
  await C.leave();
  await sleep(1000);
  await assertUnaffected('publisher left', [[A, B], [B, A]]);
  // The others close their subscriptions to the departed publisher.
  const gone = await Promise.all([A.unsubscribe(C), B.unsubscribe(C)]);
  console.log(`[publisher left] subscriber closes answered close_track_error for: ${JSON.stringify(gone.map((g) => g.alreadyClosed))}`);
  await sleep(1000);
  await assertUnaffected('subscriptions to the departed closed', [[A, B], [B, A]]);

  // 3. C comes back: new session(s), new track names, new pulls everywhere.
  C.generation += 1;
  await C.newSessions();
  await C.publish();
  await Promise.all([A.pullFrom([C]), B.pullFrom([C]), C.pullFrom([A, B])]);
  await assertEveryoneReceives(all);
  await assertUnaffected('publisher rejoined', [[A, B], [B, A]]);
  await assertFlowing([[A, B], [A, C], [B, A], [B, C], [C, A], [C, B]]);
}

test('leave and rejoin: split-session publisher leaves and comes back', { timeout: 90000 }, async () => {
  await S.evidence('leave-rejoin-split', () => scenario('split'));
});

test('leave and rejoin: bidirectional-session publisher leaves and comes back', { timeout: 90000 }, async () => {
  await S.evidence('leave-rejoin-bidi', () => scenario('bidi'));
});
