"""A loopback HTTP server that speaks the Hugging Face Hub's resolve protocol, for offline tests.

HEAD and GET on /{org}/{name}/resolve/{revision}/{filename}. HEAD carries X-Repo-Commit, ETag and
Content-Length (no X-Xet-Hash, so huggingface_hub takes the plain HTTP path). Unknown repos and
files answer 404 with the X-Error-Code header the real Hub sends.
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo, filename) -> content
        self.faults: dict[tuple[str, str], str] = {}  # (repo, filename) -> "truncate", "redirect-loop" or "stall-get"
        self.requests: list[tuple[str, str]] = []  # (method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, filename: str, content: bytes) -> None:
        self.files[(repo, filename)] = content

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        parts = handler.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if not any(r == repo for r, _ in self.files):
            return self._error(handler, 404, "RepoNotFound")
        if (repo, filename) not in self.files:
            return self._error(handler, 404, "EntryNotFound")
        content = self.files[(repo, filename)]
        fault = self.faults.get((repo, filename))
        if fault == "redirect-loop":
            handler.send_response(302)
            handler.send_header("Location", handler.path)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if fault == "stall-get" and body:
            time.sleep(30)
            return
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", COMMIT)
        reported = b"other bytes" if fault == "wrong-etag" else content  # a Hub (or proxy) reporting another hash
        handler.send_header("ETag", f'"{hashlib.sha256(reported).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(content[: len(content) // 2] if fault == "truncate" else content)
            if fault == "truncate":
                handler.close_connection = True

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
