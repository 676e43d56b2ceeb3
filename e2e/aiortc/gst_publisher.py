#!/usr/bin/python3
"""A GStreamer webrtcbin publisher (run with Debian's python3, which has gi).

Publishes VP8 video + Opus audio to an opencalls session with `autoDiscover: true`, the way a
WHIP-style ingest does: webrtcbin's offer has string mids, bundle-only m-lines and no RTP
header extensions, so the SFU must route by SSRC. Prints one JSON line
{"sessionId", "tracks"} once published, then streams for --seconds and exits.

Usage: gst_publisher.py BASE_URL APP_ID SECRET [--seconds N]
"""

import argparse
import json
import sys
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

PIPELINE = """
webrtcbin name=pc bundle-policy=max-bundle
videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1
  ! vp8enc deadline=1 keyframe-max-dist=30 ! rtpvp8pay pt=96 ! application/x-rtp,media=video,encoding-name=VP8,payload=96 ! pc.
audiotestsrc is-live=true wave=sine ! audioconvert ! audioresample ! opusenc ! rtpopuspay pt=100
  ! application/x-rtp,media=audio,encoding-name=OPUS,payload=100 ! pc.
"""


def ecdsa_pem():
    """A P-256 certificate and key in one PEM string, and the certificate's SHA-256 fingerprint.

    GStreamer's DTLS defaults to an RSA certificate; str0m's DTLS stack (dimpl 0.9) accepts
    only ECDSA client certificates, so an RSA-keyed GStreamer cannot complete the handshake
    with opencalls (see docs/compat.md). Browsers, aiortc and libwebrtc use ECDSA.
    """
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", f"{d}/k.pem", "-out", f"{d}/c.pem", "-days", "2", "-subj", "/CN=gst"],
                       check=True, capture_output=True)
        fp = subprocess.run(["openssl", "x509", "-in", f"{d}/c.pem", "-noout", "-fingerprint", "-sha256"],
                            check=True, capture_output=True, text=True).stdout.strip().split("=", 1)[1]
        return open(f"{d}/c.pem").read() + open(f"{d}/k.pem").read(), fp


def call(base, app, secret, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/apps/{app}/{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("app")
    ap.add_argument("secret")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--ecdsa", action="store_true", help="use a P-256 DTLS certificate (not RSA)")
    args = ap.parse_args()

    Gst.init(None)
    pipe = Gst.parse_launch(PIPELINE)
    pc = pipe.get_by_name("pc")
    pem, fingerprint = ecdsa_pem() if args.ecdsa else (None, None)
    if pem:
        def on_element(_bin, _sub, element):
            factory = element.get_factory()
            if factory and factory.get_name() == "dtlsdec":
                element.set_property("pem", pem)

        pipe.connect("deep-element-added", on_element)
    loop = GLib.MainLoop()
    done = {"sent": False}

    def fail(msg):
        print(json.dumps({"error": msg}), flush=True)
        loop.quit()

    def send_offer():
        if done["sent"]:
            return
        done["sent"] = True
        offer_sdp = pc.get_property("local-description").sdp.as_text()
        if fingerprint:
            # webrtcbin computed the offer's fingerprint before our certificate was set.
            offer_sdp = "\r\n".join(
                f"a=fingerprint:sha-256 {fingerprint}" if line.startswith("a=fingerprint:") else line
                for line in offer_sdp.split("\r\n"))
        session = call(args.base, args.app, args.secret, "POST", "sessions/new")
        sid = session["sessionId"]
        res = call(args.base, args.app, args.secret, "POST", f"sessions/{sid}/tracks/new", {
            "sessionDescription": {"type": "offer", "sdp": offer_sdp},
            "autoDiscover": True,
        })
        if "sessionDescription" not in res:
            return fail(f"no answer: {res}")
        ok, sdpmsg = GstSdp.SDPMessage.new_from_text(res["sessionDescription"]["sdp"])
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdpmsg)
        pc.emit("set-remote-description", answer, Gst.Promise.new())
        print(json.dumps({"sessionId": sid, "tracks": res["tracks"], "offer": offer_sdp}), flush=True)

    def on_gathering(*_):
        if pc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(send_offer)

    def on_offer(promise, _):
        reply = promise.get_reply()  # keep the reply alive (a one-liner crashes on 1.22)
        offer = reply.get_value("offer")
        pc.emit("set-local-description", offer, Gst.Promise.new())

    def on_negotiation_needed(_):
        pc.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer, None))

    pc.connect("on-negotiation-needed", on_negotiation_needed)
    pc.connect("notify::ice-gathering-state", on_gathering)
    # Some versions never report COMPLETE without candidates to gather; send after 3 s anyway.
    GLib.timeout_add(3000, lambda: (send_offer(), False)[1])
    GLib.timeout_add(int(args.seconds * 1000), loop.quit)
    pipe.set_state(Gst.State.PLAYING)
    try:
        loop.run()
    finally:
        pipe.set_state(Gst.State.NULL)


if __name__ == "__main__":
    sys.exit(main())
