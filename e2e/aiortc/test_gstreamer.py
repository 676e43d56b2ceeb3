"""GStreamer webrtcbin publishes with autoDiscover (string mids, bundle-only m-lines, no
RTP header extensions: the SFU routes by SSRC); aiortc pulls both tracks and decodes them."""

import asyncio
import json
import os
import subprocess

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from conftest import APP, SECRET

pytestmark = pytest.mark.timeout(90)
HERE = os.path.dirname(os.path.abspath(__file__))


def test_gstreamer_autodiscover_publisher_is_decoded_by_aiortc(api):
    gst = subprocess.Popen(
        ["/usr/bin/python3", os.path.join(HERE, "gst_publisher.py"), api.base, APP, SECRET, "--seconds", "25", "--ecdsa"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = gst.stdout.readline()
        assert line, "GStreamer publisher printed nothing (is Debian's python3-gi/gstreamer installed?)"
        published = json.loads(line)
        assert "error" not in published, published
        offer = published["offer"]
        assert "a=bundle-only" in offer and "a=extmap" not in offer, "the hard GStreamer offer shape"
        tracks = published["tracks"]
        assert sorted(t["mid"] for t in tracks) == ["audio0", "video0"] or \
            sorted(t["mid"] for t in tracks) == ["audio1", "video0"]
        assert all(t["trackName"] for t in tracks)

        async def pull():
            pc = RTCPeerConnection()
            frames = {"video": [], "audio": []}

            @pc.on("track")
            def on_track(track):
                async def recv():
                    try:
                        while True:
                            frames[track.kind].append(await track.recv())
                    except Exception:
                        pass
                asyncio.ensure_future(recv())

            status, s = api.call("POST", "sessions/new")
            sid = s["sessionId"]
            status, body = api.call("POST", f"sessions/{sid}/tracks/new", {"tracks": [
                {"location": "remote", "sessionId": published["sessionId"], "trackName": t["trackName"]}
                for t in tracks]})
            assert status == 200 and body["requiresImmediateRenegotiation"], body
            await pc.setRemoteDescription(RTCSessionDescription(**body["sessionDescription"]))
            await pc.setLocalDescription(await pc.createAnswer())
            status, body = api.call("PUT", f"sessions/{sid}/renegotiate", {
                "sessionDescription": {"type": "answer", "sdp": pc.localDescription.sdp}})
            assert status == 200, body
            for _ in range(200):
                if len(frames["video"]) >= 15 and len(frames["audio"]) >= 15:
                    break
                await asyncio.sleep(0.1)
            await pc.close()
            return frames

        frames = asyncio.run(pull())
        assert len(frames["video"]) >= 15, f"video frames decoded: {len(frames['video'])}"
        assert len(frames["audio"]) >= 15, f"audio frames decoded: {len(frames['audio'])}"
        assert frames["video"][-1].width == 320
    finally:
        gst.kill()
        gst.wait()
