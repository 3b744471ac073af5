"""Loopback HTTP fixtures standing in for the Hugging Face hub and Google Drive.

:class:`FakeRemote` runs a ``ThreadingHTTPServer`` on ``127.0.0.1`` (an ephemeral port) serving:

* a fake hub: ``GET /api/{models|datasets}/{owner}/{name}/tree/{revision}?recursive=true`` (JSON list
  of ``{"type": "file", "path", "size", "oid", "lfs": {"oid": sha256, "size"}}`` entries, optionally
  paginated with a ``Link: <...>; rel="next"`` header) and ``GET /[datasets/]{owner}/{name}/resolve/
  {revision}/{path}``; LFS files redirect to a ``/cdn/...`` URL on host ``localhost`` (a different host
  name, like the real CDN) so tests can check the token is not forwarded;
* a fake Drive: ``GET /embeddedfolderview?id=...`` (folder HTML like Drive's) and ``GET /download?id=...``
  which, for files marked ``confirm``, first answers with the "can't scan for viruses" HTML form.

Switches: ``truncate[key] = n`` makes the next ``n`` bodies for ``key`` (a hub file path or a Drive
file id; ``-1`` = always) announce the full ``Content-Length`` but send half and close; ``corrupt``
serves flipped bytes; ``required_token`` answers 401 without ``Authorization: Bearer <token>``.
A hostile or odd hub: ``next_link_base`` is the base URL the paging ``Link`` header names (default this
server), ``cdn_base`` the base URL LFS files redirect to (default ``http://localhost:<port>``), and
``redirects`` maps a request path (with its query) to a ``Location`` answered with a 302.
A server that sends other bodies than it lists: ``serve_instead[key] = data`` sends ``data`` for a hub file
or Drive file id while the tree API still lists the real file; ``no_content_length`` (a set of keys) sends
such a body without ``Content-Length`` (the end is the connection's close); ``endless`` (a set of keys)
streams bytes without ``Content-Length`` until the client hangs up (capped at ``ENDLESS_CAP`` so a client
that never stops still ends). ``tree_overrides[path]`` is merged into that file's tree API entry, and
``tree_padding`` adds that many bytes of whitespace to each tree page. ``body_bytes_sent[key]`` counts the
body bytes the server managed to write for ``key`` (what a client that stops reading saves shows there).
Every request is recorded in ``requests`` as ``(path_with_query, headers)``, header names spelled
``Authorization`` / ``User-Agent`` whatever case the client used.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENDLESS_CAP = 256 << 20
STREAM_CHUNK = 64 << 10


def _canonical(header: str) -> str:
    """A header name as ``Authorization`` / ``User-Agent`` whatever case the client sent (httpx sends lower
    case), so a test asking for ``"Authorization"`` cannot pass because of the spelling alone."""
    return "-".join(part.capitalize() for part in header.split("-"))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class DriveFile:
    name: str
    data: bytes
    confirm: bool = False  # answer with the virus-scan confirmation page first
    shared: bool = True  # False: answer with an HTML "access denied" page


@dataclass
class FakeRemote:
    hub_repos: dict[tuple[str, str, str], dict[str, bytes]] = field(default_factory=dict)
    lfs_suffixes: tuple[str, ...] = (".safetensors", ".bin", ".ckpt")
    tree_page_size: int | None = None
    drive_files: dict[str, DriveFile] = field(default_factory=dict)
    drive_folders: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # kind, id, title
    truncate: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    required_token: str | None = None
    next_link_base: str | None = None
    cdn_base: str | None = None
    redirects: dict[str, str] = field(default_factory=dict)
    serve_instead: dict[str, bytes] = field(default_factory=dict)
    no_content_length: set[str] = field(default_factory=set)
    endless: set[str] = field(default_factory=set)
    tree_overrides: dict[str, dict] = field(default_factory=dict)
    tree_padding: int = 0
    body_bytes_sent: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        remote = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server hook
                with remote._lock:
                    remote.requests.append((self.path, {_canonical(k): v for k, v in self.headers.items()}))
                remote._route(self)

            def log_message(self, format: str, *args: object) -> None:  # silence
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    # ---- public helpers ----

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_hub_repo(
        self, repo_id: str, files: dict[str, bytes], revision: str = "main", repo_type: str = "model"
    ) -> None:
        self.hub_repos[(repo_type, repo_id, revision)] = dict(files)

    def count(self, fragment: str) -> int:
        """Number of recorded requests whose path contains ``fragment``."""
        return sum(fragment in path for path, _ in self.requests)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)

    # ---- routing ----

    def _route(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path in self.redirects:
            return self._send(handler, 302, b"", "text/plain", {"Location": self.redirects[handler.path]})
        parsed = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        parts = [urllib.parse.unquote(p) for p in parsed.path.split("/")[1:]]
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree(handler, parts[1].rstrip("s"), f"{parts[2]}/{parts[3]}", parts[5], query)
        if parts[:1] == ["cdn"]:
            repo_type, owner, name, revision = parts[1:5]
            return self._hub_file(
                handler, repo_type, f"{owner}/{name}", revision, "/".join(parts[5:]), cdn=True
            )
        repo_type = "model"
        if parts[:1] in (["datasets"], ["spaces"]):
            repo_type, parts = parts[0].rstrip("s"), parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._hub_file(
                handler, repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), cdn=False
            )
        if parts == ["embeddedfolderview"]:
            return self._folder_view(handler, query.get("id", ""))
        if parts == ["download"]:
            return self._drive_download(handler, query)
        self._send(handler, 404, b"not found", "text/plain")

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        if self.required_token is None:
            return True
        return handler.headers.get("Authorization") == f"Bearer {self.required_token}"

    def _tree(self, handler, repo_type: str, repo_id: str, revision: str, query: dict[str, str]) -> None:
        if not self._authorized(handler):
            return self._send(handler, 401, b'{"error":"Invalid credentials"}', "application/json")
        files = self.hub_repos.get((repo_type, repo_id, revision))
        if files is None:
            return self._send(handler, 404, b'{"error":"Repository not found"}', "application/json")
        entries: list[dict] = []
        directories = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for directory in directories:
            entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": directory})
        for path in sorted(files):
            data = files[path]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if self.is_lfs(path):
                entry["oid"] = git_blob_sha1(b"pointer " + path.encode())
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entry.update(self.tree_overrides.get(path, {}))
            entries.append(entry)
        headers = {}
        if self.tree_page_size:
            start = int(query.get("cursor", "0"))
            end = start + self.tree_page_size
            if end < len(entries):
                next_query = urllib.parse.urlencode({"recursive": "true", "cursor": str(end)})
                path = urllib.parse.urlsplit(handler.path).path
                headers["Link"] = f'<{self.next_link_base or self.url}{path}?{next_query}>; rel="next"'
            entries = entries[start:end]
        body = json.dumps(entries).encode() + b" " * self.tree_padding
        self._send(handler, 200, body, "application/json", headers)

    def _hub_file(self, handler, repo_type: str, repo_id: str, revision: str, path: str, cdn: bool) -> None:
        if not cdn and not self._authorized(handler):
            return self._send(handler, 401, b"unauthorized", "text/plain")
        files = self.hub_repos.get((repo_type, repo_id, revision))
        if files is None or path not in files:
            return self._send(handler, 404, b"Entry not found", "text/plain")
        if self.is_lfs(path) and not cdn:
            location = f"{self.cdn_base or f'http://localhost:{self.port}'}/cdn/{repo_type}/{repo_id}/{revision}/{urllib.parse.quote(path)}?X-Signature=abc"
            return self._send(handler, 302, b"", "text/plain", {"Location": location})
        self._send_body(handler, path, files[path], "application/octet-stream")

    def _folder_view(self, handler, folder_id: str) -> None:
        entries = self.drive_folders.get(folder_id)
        if entries is None:
            return self._send(handler, 404, b"<html><title>Not Found</title></html>", "text/html")
        rows = []
        for kind, entry_id, title in entries:
            href = (
                f"https://drive.google.com/file/d/{entry_id}/view?usp=drive_web"
                if kind == "file"
                else f"https://drive.google.com/drive/folders/{entry_id}"
            )
            rows.append(
                f'<div class="flip-entry" id="entry-{entry_id}" tabindex="0" role="link">'
                f'<div class="flip-entry-info"><a href="{href}" target="_blank">'
                f'<div class="flip-entry-thumb"><div class="flip-folder-icon"><img src="x.png"></div></div>'
                f'<div class="flip-entry-title">{html.escape(title)}</div></a></div>'
                f'<div class="flip-entry-last-modified"><div>Jan 1, 2024</div></div></div>'
            )
        page = (
            "<!DOCTYPE html><html><head><title>Folder</title></head><body>"
            f'<div class="flip-entries">{"".join(rows)}</div></body></html>'
        )
        self._send(handler, 200, page.encode(), "text/html; charset=utf-8")

    def _drive_download(self, handler, query: dict[str, str]) -> None:
        file = self.drive_files.get(query.get("id", ""))
        if file is None:
            return self._send(handler, 404, b"<html><title>Not Found</title></html>", "text/html")
        if not file.shared:
            page = (
                b"<html><head><title>Google Drive - Access Denied</title></head><body>No access</body></html>"
            )
            return self._send(handler, 200, page, "text/html; charset=utf-8")
        if file.confirm and query.get("uuid") != "uuid-" + query["id"]:
            page = (
                "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
                f"<p>{html.escape(file.name)} is too large for Google Drive to scan for viruses.</p>"
                f'<form id="download-form" action="{self.url}/download" method="get">'
                '<input type="submit" id="uc-download-link" class="goog-inline-block" value="Download anyway"/>'
                f'<input type="hidden" name="id" value="{query["id"]}">'
                '<input type="hidden" name="export" value="download">'
                '<input type="hidden" name="confirm" value="t">'
                f'<input type="hidden" name="uuid" value="uuid-{query["id"]}"></form></body></html>'
            )
            return self._send(handler, 200, page.encode(), "text/html; charset=utf-8")
        disposition = (
            f"attachment; filename=\"{file.name}\"; filename*=UTF-8''{urllib.parse.quote(file.name)}"
        )
        self._send_body(
            handler, query["id"], file.data, "application/octet-stream", {"Content-Disposition": disposition}
        )

    # ---- responses ----

    def _stream(self, handler, key: str, chunks, content_type: str, headers: dict[str, str] | None,
                length: int | None) -> None:
        """Send ``chunks`` (``Content-Length: length`` unless ``None``), counting what was written."""
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        if length is not None:
            handler.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.close_connection = True
        try:
            for chunk in chunks:
                handler.wfile.write(chunk)
                with self._lock:
                    self.body_bytes_sent[key] = self.body_bytes_sent.get(key, 0) + len(chunk)
            handler.wfile.flush()
        except OSError:  # the client hung up: stop sending
            pass

    def _send_body(
        self, handler, key: str, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        if key in self.endless:
            sizes = (STREAM_CHUNK for _ in range(ENDLESS_CAP // STREAM_CHUNK))
            return self._stream(handler, key, (b"\x00" * size for size in sizes), content_type, headers, None)
        if key in self.serve_instead:
            data = self.serve_instead[key]
            chunks = (data[i : i + STREAM_CHUNK] for i in range(0, len(data), STREAM_CHUNK))
            length = None if key in self.no_content_length else len(data)
            return self._stream(handler, key, chunks, content_type, headers, length)
        if key in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        with self._lock:
            remaining = self.truncate.get(key, 0)
            if remaining > 0:
                self.truncate[key] = remaining - 1
        if remaining != 0:
            handler.send_response(200)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        self._send(handler, 200, data, content_type, headers)

    @staticmethod
    def _send(
        handler, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
