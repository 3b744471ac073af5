"""Google Drive: a publicly shared file or folder, over :mod:`urllib.request` (no library covers Drive).

A folder is listed through ``embeddedfolderview`` (HTML, parsed); a large file first answers with a virus-scan
confirmation form that is submitted. Drive requests never carry a token.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from ddr_core.provisioning.download import _redact, save_body
from ddr_core.provisioning.sources import (
    DEFAULT_MAX_FILE_BYTES,
    HTTP_TIMEOUT_S,
    DownloadError,
    GoogleDriveSource,
    _Fetched,
    _RemoteFile,
    _sanitize_name,
)

USER_AGENT = "ddr-provisioning/0.1 (python-urllib)"
MAX_HTML_BYTES = 4 << 20
MAX_DRIVE_FOLDER_DEPTH = 12
_BROKEN = (TimeoutError, http.client.HTTPException, OSError)
"""What reading a urllib response body raises when the connection breaks."""


class _Http:
    """urllib with ddr's user agent and a timeout; errors become :class:`DownloadError` naming the fix."""

    def __init__(self, timeout: float = HTTP_TIMEOUT_S):
        self.timeout = timeout

    def open(self, url: str, what: str) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            hint = ""
            if error.code in (401, 403):
                hint = " (access denied: check that it is shared as 'anyone with the link')"
            elif error.code == 404:
                hint = " (not found: check the file / folder id)"
            raise DownloadError(f"{what}: HTTP {error.code} {error.reason} from {_redact(url)}{hint}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(
                f"{what}: could not connect to {_redact(url)} ({reason}); check the network"
            ) from None


class _DriveFolderParser(HTMLParser):
    """Entries of ``embeddedfolderview``: links to ``/file/d/<id>`` or ``/drive/folders/<id>`` with a
    ``flip-entry-title`` div holding the name."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.entries: list[tuple[str, str, str]] = []  # (kind, id, title)
        self._link: tuple[str, str] | None = None
        self._title_depth = 0
        self._div_depth = 0
        self._title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "a":
            href = attributes.get("href", "")
            if match := re.search(r"/file/d/([\w-]+)", href):
                self._link = ("file", match.group(1))
            elif match := re.search(r"/drive/(?:u/\d+/)?folders/([\w-]+)", href) or re.search(
                r"folderview\?(?:.*&)?id=([\w-]+)", href
            ):
                self._link = ("folder", match.group(1))
        elif tag == "div":
            self._div_depth += 1
            if "flip-entry-title" in attributes.get("class", "").split():
                self._title_depth = self._div_depth
                self._title = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._title_depth and self._div_depth == self._title_depth:
                self._title_depth = 0
                if self._link is not None:
                    title = "".join(self._title).strip()
                    if all(entry[1] != self._link[1] for entry in self.entries):
                        self.entries.append((self._link[0], self._link[1], title))
            self._div_depth -= 1
        elif tag == "a":
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._title_depth:
            self._title.append(data)


class _FormParser(HTMLParser):
    """The first download form of a Drive confirmation page: action and hidden inputs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.action: str | None = None
        self.inputs: list[tuple[str, str]] = []
        self.title: list[str] = []
        self._in_form = False
        self._done = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "title":
            self._in_title = True
        if self._done:
            return
        if tag == "form" and self.action is None:
            self._in_form = True
            self.action = attributes.get("action", "")
        elif tag == "input" and self._in_form and attributes.get("name"):
            if attributes.get("type", "text").lower() not in ("submit", "button", "image", "reset"):
                self.inputs.append((attributes["name"], attributes.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)


def _filename_from_disposition(header: str | None) -> str | None:
    if not header:
        return None
    if match := re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", header):
        return urllib.parse.unquote(match.group(2).strip().strip('"'), encoding=match.group(1) or "utf-8")
    if match := re.search(r'filename\s*=\s*"([^"]*)"', header) or re.search(
        r"filename\s*=\s*([^;]+)", header
    ):
        return match.group(1).strip()
    return None


class _DriveBackend:
    def __init__(self, source: GoogleDriveSource, timeout: float = HTTP_TIMEOUT_S,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.source = source
        self.http = _Http(timeout)
        self.max_file_bytes = max_file_bytes

    def list_files(self) -> list[_RemoteFile]:
        s = self.source
        if s.file_id is not None:
            return [
                _RemoteFile(
                    path=s.filename,
                    size=None,
                    sha256=None,
                    git_sha1=None,
                    fetch=self._fetcher(s.file_id, s.filename or s.file_id),
                    label=s.filename or s.file_id,
                )
            ]
        assert s.folder_id is not None
        files: list[_RemoteFile] = []
        self._walk_folder(s.folder_id, "", files, depth=0)
        if not files:
            raise DownloadError(
                f"Google Drive folder {s.folder_id} lists no files; check that it is shared as 'anyone with the link'"
            )
        return files

    def _walk_folder(self, folder_id: str, prefix: str, files: list[_RemoteFile], depth: int) -> None:
        if depth > MAX_DRIVE_FOLDER_DEPTH:
            raise DownloadError(
                f"Google Drive folder {folder_id} nests deeper than {MAX_DRIVE_FOLDER_DEPTH} levels"
            )
        separator = "&" if "?" in self.source.folder_list_url else "?"
        url = f"{self.source.folder_list_url}{separator}id={urllib.parse.quote(folder_id)}"
        response = self.http.open(url, f"listing Google Drive folder {prefix or folder_id}")
        with response:
            charset = response.headers.get_content_charset() or "utf-8"
            page = response.read(MAX_HTML_BYTES).decode(charset, errors="replace")
        parser = _DriveFolderParser()
        parser.feed(page)
        for kind, entry_id, title in parser.entries:
            name = prefix + _sanitize_name(title or entry_id)
            if kind == "folder":
                self._walk_folder(entry_id, name + "/", files, depth + 1)
            else:
                files.append(
                    _RemoteFile(
                        path=name,
                        size=None,
                        sha256=None,
                        git_sha1=None,
                        fetch=self._fetcher(entry_id, name),
                        label=name,
                    )
                )

    def _fetcher(self, file_id: str, label: str) -> Callable[[Path], _Fetched]:
        base = self.source.base_url.rstrip("/")

        def fetch(part: Path) -> _Fetched:
            url = f"{base}/download?" + urllib.parse.urlencode(
                {"id": file_id, "export": "download", "confirm": "t"}
            )
            for _ in range(3):
                response = self.http.open(url, f"downloading {label} from Google Drive")
                content_type = response.headers.get_content_type()
                name = _filename_from_disposition(response.headers.get("Content-Disposition"))
                if content_type != "text/html" or (name and name.lower().endswith((".html", ".htm"))):
                    with response:
                        return save_body(response.read, _BROKEN, response.headers.get("Content-Length"), part,
                                         label, expected_size=None, name=name, max_bytes=self.max_file_bytes)
                with response:
                    page_url = response.geturl()
                    page = response.read(MAX_HTML_BYTES).decode(
                        response.headers.get_content_charset() or "utf-8", "replace"
                    )
                form = _FormParser()
                form.feed(page)
                if not form.action and not form.inputs:
                    title = "".join(form.title).strip() or "no title"
                    raise DownloadError(
                        f"{label}: Google Drive returned an HTML page ({title!r}) instead of the file; "
                        "check that it is shared as 'anyone with the link' and that its download quota is not exceeded"
                    )
                action = urllib.parse.urljoin(page_url, form.action or "")
                query = urllib.parse.urlencode(form.inputs)
                url = f"{action}{'&' if '?' in action else '?'}{query}" if query else action
            raise DownloadError(f"{label}: Google Drive kept answering with confirmation pages")

        return fetch
