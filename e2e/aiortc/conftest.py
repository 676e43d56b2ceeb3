"""Fixtures: an opencalls server on loopback, and a Calls API client for it."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import aioice.ice
import pytest

# The address every peer and the server's media use. scripts/test runs this suite inside a
# network namespace it creates, with one veth address (GStreamer's libnice gathers no
# loopback candidates); by default everything stays on 127.0.0.1. aioice skips loopback
# addresses, hence the patch.
MEDIA_IP = os.environ.get("OPENCALLS_E2E_IP", "127.0.0.1")
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [MEDIA_IP]

APP = "e2eaiortc0000000000000000000000"
SECRET = "e2e-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base):
        self.base = base

    def metric(self, name):
        """A counter of the server's /metrics, summed over its labelled series."""
        origin = self.base.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(f"{origin}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name or key.startswith(name + "{"):
                total += int(value)
        return total

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.base}/apps/{APP}/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def api():
    binary = os.environ.get("OPENCALLS_BIN", os.path.join(os.path.dirname(__file__), "../../target/debug/opencalls"))
    port = free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--http", f"127.0.0.1:{port}", "--udp", f"{MEDIA_IP}:0",
         "--app", f"{APP}:{SECRET}", "--workers", "2"],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("opencalls did not start")
            time.sleep(0.1)
    yield Api(base)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
