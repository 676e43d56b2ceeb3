"""aiortc publishes a synthetic video track to opencalls and keeps it flowing.

Prints one JSON line {"sessionId", "trackName"} once the SFU answered, then streams for
--seconds and exits. Used by the browser suite (a browser pulls and decodes it).
Usage: python aiortc_publisher.py BASE_URL APP_ID SECRET [--seconds N]
"""

import argparse
import asyncio
import json
import urllib.request

import aioice.ice
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


def call(base, app, secret, method, path, body=None):
    req = urllib.request.Request(f"{base}/apps/{app}/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


async def main(args):
    pc = RTCPeerConnection()
    tr = pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sid = call(args.base, args.app, args.secret, "POST", "sessions/new")["sessionId"]
    res = call(args.base, args.app, args.secret, "POST", f"sessions/{sid}/tracks/new", {
        "sessionDescription": {"type": "offer", "sdp": pc.localDescription.sdp},
        "tracks": [{"location": "local", "mid": tr.mid, "trackName": "aiortc-video"}],
    })
    await pc.setRemoteDescription(RTCSessionDescription(**res["sessionDescription"]))
    print(json.dumps({"sessionId": sid, "trackName": "aiortc-video"}), flush=True)
    await asyncio.sleep(args.seconds)
    await pc.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("app")
    ap.add_argument("secret")
    ap.add_argument("--seconds", type=float, default=20)
    asyncio.run(main(ap.parse_args()))
