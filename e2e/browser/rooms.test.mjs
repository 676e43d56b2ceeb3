// (b) Rooms: every participant pushes audio + video and pulls every other
// participant's tracks. Some participants use separate publish and subscribe
// sessions (two PCs), some one bidirectional session (push = client offer,
// pull = SFU offer, on the same RTCPeerConnection).
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { suite } from './lib/harness.mjs';
import { Participant, fillRoom, assertEveryoneReceives, assertFlowing } from './lib/room.mjs';

const S = suite('rooms');
afterEach(() => S.closePages());

function everyPair(people) {
  return people.flatMap((r) => people.filter((p) => p !== r).map((p) => [r, p]));
}

test('room of 2: one split (pub+sub sessions), one bidirectional session', { timeout: 60000 }, async () => {
  await S.evidence('room-of-2', async () => {
    const people = [new Participant(S, 'p0', 'split'), new Participant(S, 'p1', 'bidi')];
    await fillRoom(people);
    await assertEveryoneReceives(people);
    await assertFlowing(everyPair(people));
  });
});

test('room of 4: two split, two bidirectional participants', { timeout: 90000 }, async () => {
  await S.evidence('room-of-4', async () => {
    const people = [
      new Participant(S, 'p0', 'bidi'),
      new Participant(S, 'p1', 'split'),
      new Participant(S, 'p2', 'bidi'),
      new Participant(S, 'p3', 'split'),
    ];
    await fillRoom(people);
    await assertEveryoneReceives(people, { timeoutMs: 15000 });
    await assertFlowing(everyPair(people));
    // Each bidirectional PC carries its 2 pushed + 6 pulled m-lines.
    for (const p of people.filter((x) => x.mode === 'bidi')) {
      const n = await p.eval((k) => window.P.sessions[k].pc.getTransceivers().length, p.subKey);
      assert.equal(n, 8, `${p.name} has ${n} transceivers`);
    }
  });
});

// A viewer who turns the camera on later: the bidirectional session first pulls
// (SFU offer), then pushes with a client offer that must also carry the m-lines
// the SFU added earlier. The others then pull the late publisher.
test('bidirectional session: pull first, push afterwards (client offer after SFU offer)', { timeout: 60000 }, async () => {
  await S.evidence('pull-then-push', async () => {
    const a = new Participant(S, 'pa', 'split');
    const b = new Participant(S, 'pb', 'bidi');
    await a.join();
    await b.open();
    await b.newSessions();
    await b.pullFrom([a]);
    await b.waitMediaFrom([a], { timeoutMs: 5000 });
    await b.publish();
    await a.pullFrom([b]);
    await assertEveryoneReceives([a, b]);
    await assertFlowing(everyPair([a, b]));
  });
});
