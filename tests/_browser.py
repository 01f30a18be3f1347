"""A headless Chromium driven through the DevTools protocol, with real keyboard and mouse events: the grading
page's tests (``test_inspect.py``, ``test_grading_loop.py``). Debian's ``chromium``; tests skip without it."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse

import numpy as np


class CDP:
    """A minimal Chrome DevTools Protocol client over a stdlib WebSocket (RFC 6455, client side)."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(4096)
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.n = 0

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, payload: bytes, op: int = 1) -> None:
        n, mask = len(payload), os.urandom(4)
        head = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                     if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        arr = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
        self.sock.sendall(head + mask + arr.tobytes())

    def _message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            payload = self._exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 8:
                raise ConnectionError("DevTools closed the connection")
            if op == 9:
                self._send(payload, 0xA)
                continue
            if op in (0, 1, 2):
                data += payload
                if b0 & 0x80:
                    return json.loads(data)

    def call(self, method: str, session: str | None = None, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._send(json.dumps(msg).encode())
        while True:
            reply = self._message()
            if reply.get("id") == self.n:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def _browser(profile):
    """A headless chromium for the test's duration, driven through :class:`CDP`."""
    proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--no-default-browser-check", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--window-size=1000,800", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert proc.poll() is None and time.time() < deadline, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        yield CDP(f"ws://127.0.0.1:{port}{path}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _js(cdp, sid, expr):
    return cdp.call("Runtime.evaluate", sid, expression=expr, returnByValue=True)["result"].get("value")


KEYS = {"ArrowRight": ("ArrowRight", 39, ""), "ArrowLeft": ("ArrowLeft", 37, ""), "s": ("KeyS", 83, "s"),
        **{str(d): (f"Digit{d}", 48 + d, str(d)) for d in range(4)}}


def press_key(cdp, sid, key: str) -> None:
    """A real key press (keyDown, then keyUp) of ``key``, a name in :data:`KEYS`, on the page."""
    code, vk, text = KEYS[key]
    ev = dict(key=key, code=code, windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk)
    cdp.call("Input.dispatchKeyEvent", sid, type="keyDown", text=text, **ev)
    cdp.call("Input.dispatchKeyEvent", sid, type="keyUp", **ev)


def wait_cards(cdp, sid, n: int | None = None, timeout: float = 30.0) -> int:
    """Wait until the page has loaded and shows its cards (``n`` of them, or at least one): how many it shows."""
    deadline = time.time() + timeout
    while True:
        ready, _, shown = _js(cdp, sid, "document.readyState + ':' + document.querySelectorAll('.card').length"
                              ).partition(":")
        if ready == "complete" and (int(shown) == n if n is not None else int(shown) > 0):
            return int(shown)
        assert time.time() < deadline, "the page did not load"
        time.sleep(0.1)


def reload(cdp, sid, timeout: float = 30.0) -> None:
    """Reload the page and wait for the *new* document to finish loading: the old one is marked first, so a
    poll that reaches it (the reload not begun yet on a busy machine) is not taken for the new one."""
    _js(cdp, sid, "window.__beforeReload = true")
    cdp.call("Page.reload", sid)
    deadline = time.time() + timeout
    while _js(cdp, sid, "(window.__beforeReload ? 'old' : '') + document.readyState") != "complete":
        assert time.time() < deadline, "the page did not reload"
        time.sleep(0.1)


def export_grades(cdp, sid, downloads):
    """Click the page's "export grades.csv" button with a real mouse event and wait for the download: its path."""
    box = json.loads(_js(cdp, sid, "JSON.stringify(document.getElementById('export').getBoundingClientRect())"))
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for kind in ("mousePressed", "mouseReleased"):
        cdp.call("Input.dispatchMouseEvent", sid, type=kind, x=x, y=y, button="left", clickCount=1)
    path = downloads / "grades.csv"
    deadline = time.time() + 20
    while not path.exists():
        assert time.time() < deadline, f"no download: {os.listdir(downloads)}"
        time.sleep(0.1)
    time.sleep(0.2)
    return path
