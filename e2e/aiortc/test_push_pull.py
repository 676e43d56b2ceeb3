"""aiortc (a non-libwebrtc stack: aioice, Python DTLS) publishes video through opencalls
in one session and pulls it into another, decoding real frames."""

import asyncio

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

pytestmark = pytest.mark.timeout(60)


async def publish(api, track_name):
    pc = RTCPeerConnection()
    tr = pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers fully here
    status, session = api.call("POST", "sessions/new")
    assert status == 201, session
    sid = session["sessionId"]
    status, body = api.call("POST", f"sessions/{sid}/tracks/new", {
        "sessionDescription": {"type": "offer", "sdp": pc.localDescription.sdp},
        "tracks": [{"location": "local", "mid": tr.mid, "trackName": track_name}],
    })
    assert status == 200, body
    assert body["requiresImmediateRenegotiation"] is False
    assert body["tracks"] == [{"mid": tr.mid, "trackName": track_name}]
    await pc.setRemoteDescription(RTCSessionDescription(**body["sessionDescription"]))
    return pc, sid


async def subscribe(api, pub_sid, track_name):
    pc = RTCPeerConnection()
    frames = []
    got_track = asyncio.Event()

    @pc.on("track")
    def on_track(track):
        got_track.set()

        async def pull():
            try:
                while True:
                    frames.append(await track.recv())
            except Exception:
                pass

        asyncio.ensure_future(pull())

    status, session = api.call("POST", "sessions/new")
    sid = session["sessionId"]
    status, body = api.call("POST", f"sessions/{sid}/tracks/new", {
        "tracks": [{"location": "remote", "sessionId": pub_sid, "trackName": track_name}],
    })
    assert status == 200, body
    assert body["requiresImmediateRenegotiation"] is True
    item = body["tracks"][0]
    assert item["sessionId"] == pub_sid and item["trackName"] == track_name and item["mid"]
    await pc.setRemoteDescription(RTCSessionDescription(**body["sessionDescription"]))
    await pc.setLocalDescription(await pc.createAnswer())
    status, body = api.call("PUT", f"sessions/{sid}/renegotiate", {
        "sessionDescription": {"type": "answer", "sdp": pc.localDescription.sdp},
    })
    assert status == 200 and body == {}, body
    return pc, sid, frames, got_track


def test_aiortc_video_through_the_sfu(api):
    async def main():
        pub, pub_sid = await publish(api, "aiortc-cam")
        sub, _, frames, got_track = await subscribe(api, pub_sid, "aiortc-cam")
        await asyncio.wait_for(got_track.wait(), 10)
        for _ in range(150):
            if len(frames) >= 20:
                break
            await asyncio.sleep(0.1)
        await pub.close()
        await sub.close()
        return frames

    frames = asyncio.run(main())
    assert len(frames) >= 20, f"decoded only {len(frames)} frames"
    assert frames[-1].width == 640 and frames[-1].height == 480
    # aiortc negotiates AEAD_AES_256_GCM with us: the video it decoded was sealed by the
    # worker beside str0m (libsrtp, through pylibsrtp, opened it).
    egress = api.metric("opencalls_egress_rtp_total")
    assert egress >= 20, f"{egress} packets left beside str0m"
