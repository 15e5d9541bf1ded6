"""Loopback servers that speak just enough of two protocols for real end-to-end tests.

- :class:`FakeHub` answers what ``huggingface_hub`` asks a Hub endpoint
  (selected with ``HF_ENDPOINT``): ``GET /api/models/{repo}/revision/{rev}``
  (repo info with ``sha``), ``GET /api/models/{repo}/tree/{rev}`` (the tree
  listing ``snapshot_download`` uses), ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``
  with ``X-Repo-Commit``, ``ETag`` and, for LFS files, ``X-Linked-Etag`` /
  ``X-Linked-Size``; errors carry ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``) as the real Hub does. It also takes
  uploads the way ``HfApi.create_repo`` + ``create_commit`` send them with Xet
  disabled (``/api/repos/create``, ``preupload``, the LFS batch API, ``commit``).
- :class:`FakeDrive` plays Google Drive's ``/uc?export=download&id=...`` with
  the virus-scan confirm page that large files get (a form to ``/download``
  with ``confirm`` and ``uuid``).

Both run a real ``ThreadingHTTPServer`` on 127.0.0.1 in a thread; nothing
here reaches the internet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".tar")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def free_port_closed() -> int:
    """A port on 127.0.0.1 that nothing listens on (for 'server down')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    private: bool = False


class _Server:
    """A threaded HTTP server on 127.0.0.1 with a request log; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.fail_status: int | None = None  # answer every request with this status when set
        self.hang: tuple[str, float] | None = None  # (path regex, seconds): answer matching requests that late
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def handle(self, h: _Handler, method: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _Handler(BaseHTTPRequestHandler):
    owner: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _dispatch(self, method: str) -> None:
        self.owner.requests.append((method, self.path))
        if self.owner.hang and re.search(self.owner.hang[0], self.path):
            time.sleep(self.owner.hang[1])
        if self.owner.fail_status is not None:
            self.send_bytes(self.owner.fail_status, b'{"error": "internal error"}', "application/json")
            return
        self.owner.handle(self, method)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send_bytes(self, status: int, data: bytes, ctype: str = "application/octet-stream",
                   headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def send_json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers, head)


class FakeHub(_Server):
    """An in-memory Hub: ``add_commit`` publishes files; huggingface_hub downloads them."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, Repo] = {}
        self._lfs_uploads: dict[str, bytes] = {}
        self.validated: list[str] = []  # model card texts sent to /api/validate-yaml
        # Misbehaviours for the hostile-Hub tests (tests/security):
        self.answer_sha: str | None = None  # the repo info's "sha", whatever the revision really is
        self.swap_bytes: dict[str, bytes] = {}  # file name -> bytes served instead (listing and headers unchanged)
        self.any_revision = False  # resolve every unknown revision (even "../../x") to main, as a careless server might
        self.linked_etag: dict[str, str] = {}  # file name -> X-Linked-Etag / ETag header sent instead of the real one

    # -- publishing -------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", tag: str | None = None,
                   keep_parent: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        parent = repo.commits.get(repo.refs.get(branch, ""), {}) if keep_parent else {}
        snapshot = {**parent, **files}
        sha = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(snapshot))).encode()
                           + b"".join(snapshot[k] for k in sorted(snapshot))).hexdigest()
        repo.commits[sha] = snapshot
        repo.refs[branch] = sha
        if tag:
            repo.refs[tag] = sha
        return sha

    # -- protocol ---------------------------------------------------------------
    def _resolve(self, h: _Handler, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not h.headers.get("authorization")):
            h.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            return None
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None and self.any_revision:
            sha = repo.refs.get("main")
        if sha is None:
            h.send_json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}, head)
            return None
        return repo, sha

    def handle(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        raw = parts.path  # matched before unquoting: a revision arrives quoted (refs%2Fpr%2F1), as on the real Hub
        path = unquote(raw)
        query = parse_qs(parts.query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", raw):
            return self._info(h, m[1], unquote(m[2]), query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path):
            return self._info(h, m[1], "main", query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", raw):
            return self._tree(h, m[1], unquote(m[2]), query)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw):
            return self._file(h, m[1], unquote(m[2]), unquote(m[3]), head=method == "HEAD")
        if method == "POST" and path == "/api/repos/create":
            return self._create(h)
        if method == "POST" and path == "/api/validate-yaml":  # model card metadata check before a commit
            self.validated.append(json.loads(h.body() or b"{}").get("content", ""))
            return h.send_json(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            return self._preupload(h)
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(h)
        if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            self._lfs_uploads[m[1]] = h.body()
            return h.send_bytes(200, b"")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            return self._commit(h, m[1], m[2])
        h.send_json(404, {"error": f"not served by the fake hub: {method} {path}"})

    def _info(self, h: _Handler, repo_id: str, rev: str, query: dict) -> None:
        found = self._resolve(h, repo_id, rev)
        if found:
            repo, sha = found
            siblings = []
            for name, data in sorted(repo.commits[sha].items()):
                sibling: dict = {"rfilename": name}
                if query.get("blobs") in (["True"], ["true"], ["1"]):  # files_metadata=True, as the real Hub answers
                    sibling.update(blobId=git_blob_sha1(data), size=len(data))
                    if name.endswith(LFS_SUFFIXES):
                        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                          "pointerSize": 134}
                siblings.append(sibling)
            h.send_json(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": self.answer_sha or sha,
                              "private": repo.private, "siblings": siblings, "tags": [], "library_name": "softcli"})

    def _tree(self, h: _Handler, repo_id: str, rev: str, query: dict) -> None:
        found = self._resolve(h, repo_id, rev)
        if found:
            repo, sha = found
            entries = []
            for name, data in sorted(repo.commits[sha].items()):
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            h.send_json(200, entries)

    def _file(self, h: _Handler, repo_id: str, rev: str, name: str, head: bool) -> None:
        found = self._resolve(h, repo_id, rev, head)
        if not found:
            return
        repo, sha = found
        data = repo.commits[sha].get(name)
        if data is None:
            errors = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
            h.send_json(404, {"error": "Entry not found"}, errors, head)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        if name.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        status = 200
        rng = h.headers.get("Range")
        if rng and not head and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        if name in self.linked_etag:
            headers["ETag"] = headers["X-Linked-Etag"] = f'"{self.linked_etag[name]}"'
        if not head and name in self.swap_bytes:
            data = self.swap_bytes[name]
        h.send_bytes(status, data, headers=headers, head=head)

    # -- uploads (HfApi.create_repo + create_commit with HF_HUB_DISABLE_XET=1) --------
    def _create(self, h: _Handler) -> None:
        req = json.loads(h.body() or b"{}")
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        if repo_id in self.repos:
            return h.send_json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = Repo(private=bool(req.get("private")) or req.get("visibility") == "private")
        h.send_json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _preupload(self, h: _Handler) -> None:
        req = json.loads(h.body() or b"{}")
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False} for f in req.get("files", [])]
        h.send_json(200, {"files": files})

    def _lfs_batch(self, h: _Handler) -> None:
        req = json.loads(h.body() or b"{}")
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}} for o in req["objects"]]
        h.send_bytes(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                     "application/vnd.git-lfs+json")

    def _commit(self, h: _Handler, repo_id: str, branch: str) -> None:
        if repo_id not in self.repos:
            return h.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        files: dict[str, bytes] = {}
        for line in h.body().decode().splitlines():
            item = json.loads(line)
            value = item.get("value", {})
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self._lfs_uploads.get(value["oid"])
                if data is None or hashlib.sha256(data).hexdigest() != value["oid"]:
                    return h.send_json(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                files[value["path"]] = data
        sha = self.add_commit(repo_id, files, branch=unquote(branch), keep_parent=True)
        h.send_json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"})


class FakeDrive(_Server):
    """Google Drive's download flow: small files directly, large ones behind a confirm form."""

    def __init__(self, confirm_above: int = 1024) -> None:
        super().__init__()
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (name, data)
        self.confirm_above = confirm_above
        self.form_action: str | None = None  # where the confirm form points (default: this server)
        self.redirect_to: str | None = None  # answer /uc with a 302 to this URL
        self.drip: tuple[float, bool] | None = None  # (seconds per byte, whole answer or body only): a slow server
        self._tokens: set[str] = set()

    def add(self, file_id: str, name: str, data: bytes) -> None:
        self.files[file_id] = (name, data)

    def handle(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        found = self.files.get(q.get("id", ""))
        if parts.path not in ("/uc", "/download") or found is None:
            return h.send_bytes(404, b"<html><body>Sorry, the file you have requested does not exist.</body></html>",
                                "text/html; charset=utf-8")
        name, data = found
        if parts.path == "/uc" and self.redirect_to:
            return h.send_bytes(302, b"", "text/html", headers={"Location": self.redirect_to})
        if self.drip:
            return self._drip(h, name, data, *self.drip)
        needs_confirm = len(data) > self.confirm_above
        if parts.path == "/uc" and needs_confirm:
            token = uuid.uuid4().hex
            self._tokens.add(token)
            page = (f"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
                    f"<p>Google Drive can't scan this file for viruses.</p><p>{name} ({len(data)} bytes) is too large "
                    f"for Google to scan for viruses. Would you still like to download this file?</p>"
                    f'<form id="download-form" action="{self.form_action or self.url + "/download"}" method="get">'
                    f'<input type="submit" id="uc-download-link" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{q["id"]}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="{token}"></form></body></html>')
            return h.send_bytes(200, page.encode(), "text/html; charset=utf-8")
        if parts.path == "/download" and needs_confirm and q.get("uuid") not in self._tokens:
            return h.send_bytes(403, b"<html>confirm first</html>", "text/html")
        h.send_bytes(200, data, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @staticmethod
    def _drip(h: _Handler, name: str, data: bytes, seconds: float, whole: bool) -> None:
        """Send the answer one byte at a time, ``seconds`` apart: every read succeeds, the download never ends."""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n"
                f'Content-Disposition: attachment; filename="{name}"\r\n\r\n').encode()
        if not whole:
            h.wfile.write(head)
            h.wfile.flush()
        try:
            for i in range(len(data) + (len(head) if whole else 0)):
                h.wfile.write((head + data)[i:i + 1] if whole else data[i:i + 1])
                h.wfile.flush()
                time.sleep(seconds)
        except OSError:  # the client gave up
            h.close_connection = True


# -- pytest helpers shared by the hub tests ------------------------------------------------

def hub_env(hf_home, endpoint: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that uses only the given Hub and a private cache.

    The Drive endpoint points at a closed loopback port unless a test sets it,
    so no test can reach the internet.
    """
    env = {
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": f"{hf_home}/hub", "HUGGINGFACE_HUB_CACHE": f"{hf_home}/hub",
        "HF_ENDPOINT": endpoint, "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "SOFTCLI_GDRIVE_ENDPOINT": f"http://127.0.0.1:{free_port_closed()}",
        "SOFTCLI_REGISTRY": "",
    }
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """In this process, only loopback addresses can be looked up or connected to."""
    real_lookup, real_connect = socket.getaddrinfo, socket.create_connection

    def check(host) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach {host}: tests never touch the internet")

    def lookup(host, *args, **kwargs):
        check(host)
        return real_lookup(host, *args, **kwargs)

    def connect(address, *args, **kwargs):
        check(address[0])
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket, "create_connection", connect)


@pytest.fixture
def hf(monkeypatch, tmp_path):
    """In-process Hub settings (huggingface_hub read the real env at import; we patch what it reads)."""
    from huggingface_hub import constants

    def configure(endpoint: str, *, offline: bool = False, home: Path | None = None, **env: str) -> Path:
        home = home or tmp_path / "hf"
        for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "ENDPOINT": endpoint,
                            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                            "HF_HUB_OFFLINE": offline, "HF_HUB_DISABLE_XET": True,
                            "HF_TOKEN_PATH": str(home / "token"),
                            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}.items():
            monkeypatch.setattr(constants, name, value)
        base = hub_env(home, endpoint)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SOFTCLI_REGISTRY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "SOFTCLI_GDRIVE_ENDPOINT"):
            monkeypatch.setenv(name, base[name])
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return home

    return configure


