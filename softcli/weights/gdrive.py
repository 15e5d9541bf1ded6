"""Google Drive downloads of official releases, with the rules a hostile server must not get past.

Only Drive's own hosts (or the configured endpoint's host) are contacted,
redirects included, never from https down to http; every request has a
timeout and the whole download one deadline that shuts its sockets down
(``SOFTCLI_DOWNLOAD_DEADLINE``); the size is capped; the file appears only
when complete. urllib is used rather than huggingface_hub because Drive is not
a Hub, and its confirm page needs a cookie jar and an HTML form parser.
"""

from __future__ import annotations

import contextlib
import html
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self
from urllib.parse import urlencode, urljoin, urlsplit

from ..errors import OriginUnavailable, WeightsError
from ..io.atomic import atomic_path
from .config import DEADLINE_ENV, ProgressFn, download_deadline, download_timeout

GDRIVE_ENV = "SOFTCLI_GDRIVE_ENDPOINT"
GDRIVE_DEFAULT = "https://drive.google.com"
GDRIVE_HOSTS = {"drive.google.com", "drive.usercontent.google.com"}
MAX_ORIGIN_BYTES = 4 * 1024**3  # the largest official SOFT checkpoint is well under 1 GB


class _ConfirmForm(HTMLParser):
    """Finds Drive's 'download anyway' form: its action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and (a.get("id") == "download-form" or "download" in a.get("action", "")):
            self._in_form, self.action = True, a.get("action")
        elif tag == "input" and self._in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in a.get("href", ""):
            self.links.append(html.unescape(a["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _confirm_url(page: str, base: str, file_id: str, jar: CookieJar) -> str | None:
    """The URL Drive's virus-scan warning page says to fetch to get the file itself."""
    form = _ConfirmForm()
    form.feed(page)
    if form.action:
        return urljoin(base + "/", form.action) + "?" + urlencode(form.fields)
    if form.links:
        return urljoin(base + "/", form.links[0])
    for cookie in jar:  # the older flow: a download_warning cookie holds the confirm token
        if cookie.name.startswith("download_warning"):
            return f"{base}/uc?" + urlencode({"export": "download", "confirm": cookie.value, "id": file_id})
    return None


class _Deadline:
    """One clock for a whole download: when it runs out, every socket it opened is shut down.

    A per-read timeout alone never fires against a server that sends a byte
    every few seconds; shutting the sockets down makes the blocked read return.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def left(self) -> float:
        return max(0.01, self.end - time.monotonic())

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self.end

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _deadline_handlers(deadline: _Deadline) -> list[urllib.request.BaseHandler]:
    """HTTP(S) handlers whose connections register their sockets with ``deadline``."""

    def tracked(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Tracked(base):  # type: ignore[valid-type,misc]
            def connect(self) -> None:
                super().connect()
                deadline.track(self.sock)
        return Tracked

    plain, secure = tracked(http.client.HTTPConnection), tracked(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(plain, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(secure, req, context=getattr(self, "_context", None))

    return [HTTP(), HTTPS()]


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, over http(s), never from https down to http."""

    def __init__(self, allowed: set[str], file_id: str) -> None:
        self.allowed, self.file_id = allowed, file_id

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = urlsplit(newurl)
        downgrade = urlsplit(req.full_url).scheme == "https" and new.scheme != "https"
        if new.netloc not in self.allowed or new.scheme not in ("http", "https") or downgrade:
            why = ("from https down to plain http" if downgrade and new.netloc in self.allowed else
                   f"which is not an allowed host ({', '.join(sorted(self.allowed))})")
            raise WeightsError(f"Google Drive redirected the download of {self.file_id} to {new.scheme}://"
                               f"{new.netloc[:80]}, {why}; refusing to follow it")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def gdrive_download(file_id: str, dest: Path, *, endpoint: str | None = None, progress: ProgressFn | None = None,
                    max_bytes: int = MAX_ORIGIN_BYTES, deadline: float | None = None) -> None:
    """Download a public Google Drive file, following the confirm page large files get.

    Only Drive's own hosts (or the configured endpoint's host) are contacted,
    redirects included; every request has a timeout and the whole download a
    deadline (``deadline`` seconds, default :func:`download_deadline`); the
    size is capped; ``dest`` appears only when the download is complete.
    """
    base = (endpoint or os.environ.get(GDRIVE_ENV) or GDRIVE_DEFAULT).rstrip("/")
    allowed = GDRIVE_HOSTS | {urlsplit(base).netloc}
    jar = CookieJar()
    with _Deadline(deadline or download_deadline()) as clock:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                             _AllowListRedirects(allowed, file_id), *_deadline_handlers(clock))
        url = f"{base}/uc?" + urlencode({"export": "download", "id": file_id})
        for _ in range(3):
            if urlsplit(url).netloc not in allowed or urlsplit(url).scheme not in ("http", "https"):
                raise WeightsError(f"Google Drive sent the download of {file_id} to an unexpected host ({url[:80]})")
            try:
                resp = opener.open(urllib.request.Request(url, headers={"User-Agent": "softcli"}),
                                   timeout=min(download_timeout(), clock.left()))
                with resp:
                    if resp.headers.get_content_type() != "text/html":
                        _stream(resp, dest, progress, max_bytes, file_id, clock)
                        return
                    page = _read_page(resp, 2 * 1024 * 1024)
            except urllib.error.HTTPError as exc:
                detail = "no such file or not shared publicly" if exc.code == 404 else f"HTTP {exc.code}"
                raise WeightsError(f"Google Drive file {file_id}: {detail} ({base})") from exc
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, cut-off answers
                if clock.passed():
                    raise WeightsError(f"downloading Google Drive file {file_id} from {base} did not finish within "
                                       f"{clock.seconds:g} s (set {DEADLINE_ENV} to allow longer)") from exc
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                raise WeightsError(f"cannot reach Google Drive at {base} ({reason})") from exc
            url = _confirm_url(page, base, file_id, jar) or ""
            if not url:
                raise OriginUnavailable(f"Google Drive answered with a page instead of file {file_id} (download "
                                        "quota exceeded, or the file is not public); download it in a browser")
    raise WeightsError(f"Google Drive kept asking to confirm the download of {file_id}")


def _read_page(resp: Any, limit: int) -> str:
    """At most ``limit`` bytes of an HTML answer, one socket read at a time (so the deadline can stop it)."""
    data = b""
    while len(data) < limit and (chunk := resp.read1(limit - len(data))):
        data += chunk
    return data.decode("utf-8", "replace")


def _stream(resp: Any, dest: Path, progress: ProgressFn | None, max_bytes: int, file_id: str,
            clock: _Deadline) -> None:
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > max_bytes:
        raise WeightsError(f"Google Drive file {file_id} is {total} bytes, over the {max_bytes}-byte limit")
    done = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        while chunk := resp.read1(1024 * 1024):  # one socket read: returns what arrived, never waits for a full MB
            done += len(chunk)
            if done > max_bytes:
                raise WeightsError(f"Google Drive file {file_id} is over the {max_bytes}-byte limit")
            fh.write(chunk)
            if progress:
                progress(done, total)
        fh.flush()
        if (total is None or done != total) and clock.passed():  # the deadline shut the socket mid-file
            raise TimeoutError("download deadline")
        if total is not None and done != total:
            raise WeightsError(f"Google Drive file {file_id}: connection closed after {done} of {total} bytes")
