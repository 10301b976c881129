"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the HTTP `hf_hub_download` uses:
HEAD/GET /{repo}/resolve/{revision}/{file} with X-Repo-Commit, ETag and Content-Length, Range requests
(206), X-Error-Code on 404, 401 for private repos without the token. `plain` serves files at fixed paths
(a release server: GET with Range, `cut_next_get_at` drops a transfer midway, 404 for anything else)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # private: requests need "Authorization: Bearer <token>"


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)  # path (query ignored) -> body
    content_types: dict[str, str] = field(default_factory=dict)  # path -> Content-Type (default octet-stream)
    cut_next_get_at: int | None = None  # send only this many bytes of the next GET, then drop it
    cut_every_get_at: int | None = None  # the same for every GET (a link that always breaks)
    throttle_s: float = 0.0  # pause after each 256 KiB sent (to make two clients overlap)
    range_offset: int = 0  # a 206 answer starts this many bytes away from the asked offset (a broken proxy)
    claim_length: int | None = None  # Content-Length to announce instead of the real one (sends nothing)
    stall_next_get_at: int | None = None  # send this many bytes of the next GET, then stall (no close)
    stall_s: float = 5.0
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status, code=None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body):
                hub.log.append((self.command, self.path, self.headers.get("Range")))
                plain_path = self.path.split("?")[0]
                if plain_path in hub.plain:
                    return self._send(hub.plain[plain_path], body, hub.content_types.get(plain_path))
                m = re.fullmatch(r"/(?:api/models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)",
                                 self.path.split("?")[0])
                if not m:
                    return self._error(404, "RepoNotFound")
                repo_id, revision, filename = m.groups()
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound")
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    return self._error(401)
                if revision not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound")
                if filename not in repo.files:
                    return self._error(404, "EntryNotFound")
                self._send(repo.files[filename], body, None, repo.commit)

            def _send(self, data, body, content_type, commit=None):
                start = 0
                rng = self.headers.get("Range")
                if rng and (mm := re.fullmatch(r"bytes=(\d+)-", rng)):
                    start = int(mm.group(1))
                if start >= len(data) > 0:
                    return self._error(416)
                if start:
                    start = max(0, start + hub.range_offset)
                if hub.claim_length is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", content_type or "application/octet-stream")
                    self.send_header("Content-Length", str(hub.claim_length))
                    self.end_headers()
                    self.close_connection = True
                    return
                self.send_response(206 if start else 200)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", content_type or "application/octet-stream")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                cut = hub.cut_every_get_at
                if hub.cut_next_get_at is not None:
                    cut, hub.cut_next_get_at = hub.cut_next_get_at, None
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if hub.stall_next_get_at is not None:
                    stall, hub.stall_next_get_at = hub.stall_next_get_at, None
                    self.wfile.write(payload[:stall])
                    self.wfile.flush()
                    time.sleep(hub.stall_s)  # the client's read times out meanwhile
                    self.close_connection = True
                    return
                for i in range(0, len(payload), 1 << 18):
                    self.wfile.write(payload[i : i + (1 << 18)])
                    if hub.throttle_s:
                        time.sleep(hub.throttle_s)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
