// (h) Simulcast: the browser publishes one video track in two layers (rid `h` at 640x480,
// rid `l` scaled down by 2). Chromium names no SSRCs in a simulcast offer, so the SFU must
// learn each layer's SSRC from the MID and RID header extensions of its first packets (and
// each RTX SSRC from the repaired-RID one). A subscriber asks for `l`, then switches to `h`
// with tracks/update; the frame width it decodes shows which layer it gets.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { suite, inPage } from './lib/harness.mjs';

const S = suite('simulcast');
afterEach(() => S.closePages());

// Waits until session `key`'s pulled `mid` decodes frames of `width`; the last stats.
async function waitWidth(page, key, mid, width, ms = 15000) {
  return inPage(page, async ([key, mid, width, ms]) => {
    const until = performance.now() + ms;
    let last;
    for (;;) {
      last = (await window.P.inbound(key))[mid];
      if (last && last.frameWidth === width && last.framesDecoded > 0) return { ok: true, last };
      if (performance.now() > until) return { ok: false, last };
      await new Promise((res) => setTimeout(res, 200));
    }
  }, [key, mid, width, ms], ms + 5000);
}

test('simulcast: a subscriber gets the layer it prefers, and another after tracks/update', { timeout: 90000 }, async () => {
  await S.evidence('simulcast', async () => {
    const page = await S.openPage('simulcast');
    await inPage(page, () => window.P.getMedia('cam', { width: 640, height: 480 }));
    await inPage(page, () => window.P.newSession('A'));
    const [pushed] = await inPage(page, () => window.P.pushSimulcast('A', [
      { rid: 'h' },
      { rid: 'l', scaleResolutionDownBy: 2 },
    ]));
    await inPage(page, () => window.P.waitIce('A', 10000));
    await inPage(page, () => window.P.newSession('B'));
    const pulled = await inPage(page, (p) => window.P.pull('B', [{
      sessionId: p.sessionId, trackName: p.trackName, kind: 'video', simulcast: { preferredRid: 'l' },
    }]), pushed);
    const mid = pulled.tracks[0].mid;
    const low = await waitWidth(page, 'B', mid, 320);
    console.log(`preferred l: ${JSON.stringify(low.last)}`);
    assert.ok(low.ok, `subscriber decodes the low layer (320 wide): ${JSON.stringify(low.last)}`);

    await inPage(page, ([mid]) => window.P.update('B', mid, { preferredRid: 'h' }), [mid]);
    const high = await waitWidth(page, 'B', mid, 640);
    console.log(`after update to h: ${JSON.stringify(high.last)}`);
    assert.ok(high.ok, `subscriber decodes the high layer (640 wide) after tracks/update: ${JSON.stringify(high.last)}`);
    assert.ok(high.last.framesDecoded > low.last.framesDecoded, 'frames kept coming across the switch');
  });
});
