"""Local stand-ins for what the backend talks to: a fake Label Studio media host and a real
redis-server, both on loopback."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import parse_qs, urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A threading HTTP(S) server on 127.0.0.1, on a free port, serving in a daemon thread."""

    def serve(self, handler, tls=None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeLabelStudio(LoopbackServer):
    """Serves uploads (token required, as LS does), public images, a 404, a slow and a huge file."""

    def __init__(self, token: str, personal_access_token: Optional[str] = None, access_token: Optional[str] = None) -> None:
        self.token = token
        self.personal_access_token = personal_access_token  # exchanged at /api/token/refresh/
        self.access_token = access_token
        self.uploads: Dict[str, bytes] = {}  # "1/cat.png" -> bytes
        self.public: Dict[str, bytes] = {}  # "cat.png" -> bytes
        self.delay_s: Dict[str, float] = {}  # "cat.png" -> seconds before it is served
        self.requests: List[dict] = []
        self.proxy_status: Optional[int] = None  # e.g. 400, as Label Studio's own server answers its upload proxy
        self.drops: Dict[str, int] = {}  # path -> connections closed before any answer (a busy server)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                fake.requests.append({"path": self.path, "headers": dict(self.headers)})
                url = urlparse(self.path)
                if fake.drops.get(url.path, 0) > 0:
                    fake.drops[url.path] -= 1
                    self.close_connection = True
                    return None
                if url.path.startswith("/storage-data/uploaded") and fake.proxy_status:
                    return self.send_error(fake.proxy_status)
                if url.path.startswith("/storage-data/uploaded"):
                    key = (parse_qs(url.query).get("filepath") or [""])[0].removeprefix("upload/")
                    return self._private(key)
                if url.path.startswith("/data/upload/"):
                    return self._private(url.path.removeprefix("/data/upload/"))
                if url.path.startswith("/img/") and url.path[5:] in fake.public:
                    time.sleep(fake.delay_s.get(url.path[5:], 0.0))
                    return self._send(fake.public[url.path[5:]])
                if url.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"x" * 100)
                            self.wfile.flush()
                            time.sleep(0.1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client gave up, as it should
                    return None
                if url.path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 ** 10))
                    self.end_headers()
                    return None
                self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                fake.requests.append({"path": self.path, "headers": dict(self.headers)})
                if self.path.rstrip("/") == "/api/token/refresh" and fake.personal_access_token \
                        and body.get("refresh") == fake.personal_access_token:
                    data = json.dumps({"access": fake.access_token}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                self.send_error(401)

            def _private(self, key):
                allowed = {f"Token {fake.token}", f"Bearer {fake.access_token}" if fake.access_token else None}
                if self.headers.get("Authorization") not in allowed:
                    return self.send_error(401)
                if key not in fake.uploads:
                    return self.send_error(404)
                return self._send(fake.uploads[key])

            def _send(self, data: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.serve(Handler)


class RedisServer:
    """A throwaway redis-server on a free loopback port; can be stopped and started again."""

    def __init__(self, data_dir: Optional[Path] = None) -> None:
        self.data_dir = data_dir  # with one, every write is on disk first (append-only, fsync always)
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server); "
                               "the Redis tests need a real server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class HostileServer(LoopbackServer):
    """An image host that misbehaves on purpose, on 127.0.0.1 only; every answer ends by itself
    within `max_seconds`. /ok.png serves an image; /drip-headers and /drip-body send one byte
    every `drip_s`; /endless streams a body without end; /redirect?to=URL answers 302."""

    def __init__(self, image: bytes, drip_s: float = 0.2, max_seconds: float = 30.0, tls=None) -> None:
        """`tls`: an ssl.SSLContext to serve https instead."""
        self.requests: List[dict] = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server_self.requests.append({"path": self.path, "headers": dict(self.headers)})
                self.send_error(401)

            def do_GET(self):
                server_self.requests.append({"path": self.path, "headers": dict(self.headers)})
                url = urlparse(self.path)
                stop = time.monotonic() + max_seconds
                try:
                    if url.path == "/ok.png":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(image)))
                        self.end_headers()
                        self.wfile.write(image)
                    elif url.path == "/redirect":
                        self.send_response(302)
                        self.send_header("Location", parse_qs(url.query)["to"][0])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif url.path == "/drip-headers":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        while time.monotonic() < stop:
                            self.wfile.write(b"X")
                            self.wfile.flush()
                            time.sleep(drip_s)
                    elif url.path in ("/drip-body", "/endless"):
                        self.send_response(200)
                        if url.path == "/drip-body":
                            self.send_header("Content-Length", "1000000")
                        self.end_headers()
                        while time.monotonic() < stop:
                            self.wfile.write(b"x" if url.path == "/drip-body" else b"x" * 65536)
                            self.wfile.flush()
                            if url.path == "/drip-body":
                                time.sleep(drip_s)
                    else:
                        self.send_error(404)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

        self.serve(Handler, tls)
