"""Turn a model spec into a local checkpoint: registry names, Hub repos, files.

A *model spec* is one of

- a registry name (``soft_tiny``; see :mod:`softcli.registry`),
- ``hf-hub:ORG/REPO[@REVISION]`` (a branch, tag or commit on the Hugging Face Hub),
- a local folder (softcli layout) or checkpoint file.

Hub downloads go through ``huggingface_hub`` and its cache, so ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` work as
everywhere else; a revision is resolved to a commit once (recorded in the
cache's ``refs/``) and the snapshot of that commit is used. Every network call
has a timeout (``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds,
default 10), and an unreachable Hub falls back to the cache.

Nothing a user types or a server answers becomes a path unchecked: a revision
must be a git branch/tag name or a 40-hex commit, the commit the Hub resolves
it to must be 40 hex, and a file's ETag must be a hash. Every Hub file is
checked against the hash the Hub's listing advertises (LFS sha256, or the git
blob id); a file that fails is deleted, and cached files are hashed again on
every use, so a poisoned cache is never trusted.

When a registry model's Hub repo is missing or unreachable, its official
release (the Google Drive file the SOFT authors published) is downloaded (only
from Drive's hosts, redirects included, within ``SOFTCLI_DOWNLOAD_DEADLINE``
seconds in all), checked against the registry's sha256 (or, when the registry
has none yet, the sha256 of its first download here), converted to the softcli
layout and kept under ``$HF_HOME/softcli/origin/NAME`` with the sha256 of the
converted weights, which is checked again on every later use.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode, urljoin, urlsplit

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, build_model, read_checkpoint, save_pretrained
from .errors import CheckpointError, OutputError, SoftError
from .io.atomic import atomic_dir, atomic_path
from .io.hashing import hash_file, sha256_file
from .registry import COMMIT_RE, SHA256_RE, Registry, RegistryEntry, load_registry, revision_problem

HF_PREFIX = "hf-hub:"
#: What a pull fetches from a repo: the weights, our config and the model card.
HUB_PATTERNS = ["*.safetensors", CONFIG_NAME, "README.md"]
GDRIVE_ENV = "SOFTCLI_GDRIVE_ENDPOINT"
DEADLINE_ENV = "SOFTCLI_DOWNLOAD_DEADLINE"
GDRIVE_DEFAULT = "https://drive.google.com"
GDRIVE_HOSTS = {"drive.google.com", "drive.usercontent.google.com"}
MAX_ORIGIN_BYTES = 4 * 1024**3  # the largest official SOFT checkpoint is well under 1 GB
ORIGIN_MANIFEST = "origin.json"
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

WHAT_TO_DO = ("pull it on a connected machine ('soft weights pull {spec}') and copy the cache folder, "
              "point HF_HOME at a copied cache, or pass --weights FILE")

ProgressFn = Callable[[int, int | None], None]


class WeightsError(SoftError):
    """Weights cannot be found, downloaded or verified."""


class HubUnavailable(WeightsError):
    """The Hub repo is missing, or unreachable with nothing cached: a registry model may fall back to its origin."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _not_cached(spec: str, reason: str) -> HubUnavailable:
    return HubUnavailable(f"{spec} is not in the cache ({hub_cache()}) and {reason}; " + WHAT_TO_DO.format(spec=spec),
                          reason)


@dataclass
class ResolvedWeights:
    """Where a model spec's weights are on disk, and how they got there."""

    spec: str
    kind: str  # "registry", "hub" or "path"
    path: Path  # a file or a softcli folder, ready for read_checkpoint
    source: str  # "local", "hub" or "origin"
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    registry_name: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# -- environment ----------------------------------------------------------------------

def _env_seconds(name: str, default: float = 10.0) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def meta_timeout() -> float:
    return _env_seconds("HF_HUB_ETAG_TIMEOUT")


def download_timeout() -> float:
    return _env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")


def hf_home() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def origin_cache() -> Path:
    """softcli's own cache of weights converted from official releases."""
    return hf_home() / "softcli" / "origin"


# -- spec parsing -----------------------------------------------------------------------

def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/REPO[@REV]`` → (repo_id, revision or None)."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    if not _REPO_RE.match(repo_id) or (_ and not revision):
        raise WeightsError(f"{spec!r} is not a Hub model spec; expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    if revision:
        check_revision(spec, revision)
    return repo_id, revision or None


def spec_kind(spec: str, registry: Registry | None = None) -> str:
    """``hub``, ``registry`` or ``path``: registry names win over same-named files (write ./NAME for those)."""
    if spec.startswith(HF_PREFIX):
        return "hub"
    registry = registry or load_registry()
    if spec in registry and os.sep not in spec and "/" not in spec:
        return "registry"
    return "path"


# -- the Hugging Face Hub -----------------------------------------------------------------

def _storage_folder(repo_id: str) -> Path:
    # The documented cache layout: models--ORG--NAME/{refs,snapshots,blobs}.
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def check_revision(spec: str, revision: str) -> str:
    """``revision`` if it is a branch/tag name or a 40-hex commit; a clear error otherwise (no path is built first)."""
    why = revision_problem(revision)
    if why is not None:
        raise WeightsError(f"{spec}: {revision!r} is not a branch, tag or 40-hex commit ({why})")
    return revision


def _check_commit(spec: str, commit: object) -> str:
    """The commit id a Hub (or the cache's refs/) gave, if it is 40 hex; it becomes a folder name."""
    if not isinstance(commit, str) or not COMMIT_RE.match(commit):
        raise WeightsError(f"{spec}: the Hub answered {str(commit)[:80]!r} as the commit id, not 40 hex digits; "
                           "refusing to use that answer")
    return commit


class TamperedFile(WeightsError):
    """A downloaded or cached file does not have the hash it should; it has been deleted."""


#: (algorithm, hex digest): "sha256" for LFS files (the LFS oid), "git-sha1" for files stored in git.
Digest = tuple[str, str]


def _file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return sha256_file(path)
    return hash_file(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))  # git's blob id


def _valid_digest(digest: Digest) -> bool:
    algorithm, value = digest
    return bool((SHA256_RE if algorithm == "sha256" else COMMIT_RE).match(value))


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch(name, pattern) for pattern in HUB_PATTERNS)


def _advertised_digests(spec: str, siblings: list[Any] | None) -> dict[str, Digest]:
    """What the Hub's file listing says each wanted file hashes to (LFS oid, else git blob id)."""
    out: dict[str, Digest] = {}
    for sibling in siblings or []:
        name = str(sibling.rfilename)
        if not _wanted(name):
            continue
        lfs = getattr(sibling, "lfs", None)
        lfs_sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        blob_id = str(getattr(sibling, "blob_id", None) or "").lower()
        digest: Digest = ("sha256", str(lfs_sha).lower()) if lfs_sha else ("git-sha1", blob_id)
        if not _valid_digest(digest):
            raise WeightsError(f"{spec}: the Hub lists {name} without a valid {digest[0]} hash; refusing to "
                               "download a file that cannot be verified")
        out[name] = digest
    return out


def _manifest_path(repo_id: str, commit: str) -> Path:
    """softcli's record of the hashes a snapshot was verified against (for caches without blob symlinks)."""
    return hf_home() / "softcli" / "verified" / _storage_folder(repo_id).name / f"{commit}.json"


def _recorded_digests(repo_id: str, commit: str) -> dict[str, Digest]:
    try:
        files = json.loads(_manifest_path(repo_id, commit).read_text())["files"]
        return {str(k): (str(v[0]), str(v[1])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def _record_digests(repo_id: str, commit: str, digests: dict[str, Digest]) -> None:
    path = _manifest_path(repo_id, commit)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"repo_id": repo_id, "commit": commit, "files": digests}, indent=1) + "\n")
    except OSError:
        pass  # a read-only HF_HOME: the blob names still carry the hashes


def _blob_digest(file: Path, storage: Path) -> Digest | None:
    """huggingface_hub names each blob by its hash: sha256 for LFS files, the git blob id otherwise."""
    if not file.is_symlink():
        return None
    target = Path(os.path.realpath(file))
    if target.parent != (storage / "blobs").resolve():
        return None
    if SHA256_RE.match(target.name):
        return ("sha256", target.name)
    return ("git-sha1", target.name) if COMMIT_RE.match(target.name) else None


def _discard(file: Path, storage: Path) -> None:
    """Delete a bad file: its blob (only inside this repo's cache folder) and the snapshot's link to it."""
    target = Path(os.path.realpath(file))
    if target != file.absolute() and storage.resolve() in target.parents:
        target.unlink(missing_ok=True)
    file.unlink(missing_ok=True)


def _verify_snapshot(spec: str, repo_id: str, folder: Path, commit: str,
                     expected: dict[str, Digest] | None = None) -> None:
    """Hash every wanted file of a snapshot; a mismatch deletes the file and raises :class:`TamperedFile`.

    ``expected`` is what the Hub's listing advertised (a fresh download);
    without it the hashes recorded at download time, or the blob names, are
    the reference. A file with no reference at all is refused too.
    """
    storage = _storage_folder(repo_id)
    reference = {**_recorded_digests(repo_id, commit), **(expected or {})}
    blobs = (storage / "blobs").resolve()
    for file in sorted(p for p in folder.iterdir() if _wanted(p.name)):
        if file.is_symlink() and Path(os.path.realpath(file)).parent != blobs:
            file.unlink()  # only the link: what it points to is outside this cache and not ours to delete
            raise TamperedFile(f"{spec} (commit {commit[:12]}): {file.name} pointed outside the cache's blobs "
                               "folder; the link was deleted and is not used")
        digest = reference.get(file.name) or _blob_digest(file, storage)
        if digest is None:
            raise WeightsError(f"{spec}: {file} has no recorded hash to check it against; run "
                               f"'soft weights pull {spec} --force' to download it again, verified")
        actual = _file_digest(file, digest[0])
        if actual != digest[1]:
            _discard(file, storage)
            raise TamperedFile(f"{spec} (commit {commit[:12]}): {file.name} has {digest[0]} {actual}, expected "
                               f"{digest[1]}; the file was deleted and is not used")


def _cached_snapshot(repo_id: str, revision: str) -> tuple[Path, str] | None:
    """The cached snapshot of a (checked) revision, without any network call; not yet hash-verified."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                        local_files_only=True))
    except Exception:  # noqa: BLE001 - nothing (usable) cached: LocalEntryNotFoundError, IncompleteSnapshotError...
        return None
    commit = folder.name
    if not COMMIT_RE.match(commit) or folder.parent.resolve() != (_storage_folder(repo_id) / "snapshots").resolve():
        return None  # a refs/ file that does not name a commit: never follow it
    return (folder, commit) if _has_weights(folder) else None


def _record_ref(repo_id: str, revision: str, commit: str) -> None:
    """Remember revision → commit in the cache's refs/ so offline use finds the snapshot.

    Both are checked first (a branch/tag name, 40 hex): huggingface_hub 2.4
    writes refs/REV from whatever the server answers, so softcli resolves the
    commit itself, downloads that exact commit, and records the ref here.
    """
    if revision == commit or revision_problem(revision) or not COMMIT_RE.match(commit):
        return
    ref = _storage_folder(repo_id) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text().strip() != commit:
            with atomic_path(ref) as tmp:
                tmp.write_text(commit)
    except OSError:
        pass  # a read-only cache still works for this run


def _describe(exc: BaseException) -> str:
    """A short, user-readable reason for a failed network call."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} from {urlsplit(str(exc.response.url)).netloc}"
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 6:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__} {x}" for x in chain).lower()
    if "timed out" in text or "timeout" in text:
        return f"no answer within {meta_timeout():g} s"
    if "refused" in text:
        return "connection refused"
    if any(t in text for t in ("name or service", "nodename", "getaddrinfo", "name resolution")):
        return "host name not found"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:160]}" if first else type(exc).__name__


def _classify(exc: BaseException) -> str:
    """``missing`` (repo or revision absent / no access) or ``unreachable`` (network, server error)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)):
        return "missing"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403, 404):
        return "missing"
    return "unreachable"


def _missing_message(repo_id: str, revision: str | None, exc: BaseException) -> str:
    from huggingface_hub.errors import RevisionNotFoundError

    where = hub_endpoint()
    if isinstance(exc, RevisionNotFoundError):
        return f"hf-hub:{repo_id} has no revision {revision!r} on {where}"
    from huggingface_hub import get_token

    token = "" if get_token() else "; if it is private or gated, set HF_TOKEN"
    return f"no model repo hf-hub:{repo_id} on {where} ({_describe(exc)}){token}"


def pull_hub(repo_id: str, revision: str | None = None, *, force: bool = False,
             local_only: bool = False) -> tuple[Path, str]:
    """Download (or find in the cache) a repo snapshot, every file hash-checked; returns (folder, commit).

    The revision must be a branch/tag name or a 40-hex commit. Online, it is
    resolved to its commit first (one small request with a timeout; the
    answer must be 40 hex), then the snapshot of that commit is fetched with
    ``snapshot_download`` and each file is checked against the hash the Hub's
    listing advertises (the LFS sha256, or the git blob id). A file that fails
    is deleted, so a later pull downloads it again instead of trusting it. A
    commit that is already cached needs no network; cached files are hashed
    again on every use.
    """
    spec = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    revision = check_revision(spec, revision or "main")
    pinned = bool(COMMIT_RE.match(revision))
    offline = local_only or is_offline()
    cached = None if force and not offline else _cached_snapshot(repo_id, revision)
    if cached and (offline or pinned):
        try:
            _verify_snapshot(spec, repo_id, *cached)
            return cached
        except TamperedFile as exc:
            if offline:
                raise TamperedFile(f"{exc}; run 'soft weights pull {spec}' where the Hub can be reached to "
                                   "download it again") from exc
            cached = None  # online: fetch it again below
    if offline:
        raise _not_cached(spec, "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "downloads are off here")

    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, files_metadata=True,
                                                         timeout=meta_timeout())
    except Exception as exc:  # every failure becomes one clear line below
        if _classify(exc) == "missing":
            msg = _missing_message(repo_id, revision, exc)
            raise HubUnavailable(msg, msg) from exc
        if cached:
            _verify_snapshot(spec, repo_id, *cached)
            return cached
        raise _not_cached(spec, f"the Hub at {hub_endpoint()} cannot be reached ({_describe(exc)})") from exc
    commit = _check_commit(spec, info.sha)
    expected = _advertised_digests(spec, info.siblings)
    try:
        folder = _download_snapshot(spec, repo_id, commit, expected, force)
    except TamperedFile:
        # The cache may have held a bad copy (it is deleted now): one fresh download, checked again.
        folder = _download_snapshot(spec, repo_id, commit, expected, force)
    _record_ref(repo_id, revision, commit)
    _record_digests(repo_id, commit, expected)
    if not _has_weights(folder):
        raise WeightsError(f"{spec} (commit {commit[:12]}) holds no .safetensors weights; a softcli repo has "
                           f"{WEIGHTS_NAME} + {CONFIG_NAME} (see 'soft weights convert')")
    return folder, commit


_ETAG_LOCK = threading.Lock()


@contextlib.contextmanager
def _hex_etags_only() -> Iterator[None]:
    """While softcli downloads, a file's ETag must be a 40- or 64-hex hash.

    huggingface_hub 2.4 names each cache blob after the ETag header without
    checking it, so a server answering ``X-Linked-Etag: "../../x"`` makes it
    write outside the cache. Its ETag parser is wrapped for the duration of
    softcli's own downloads; should a later version drop that function, the
    check in :func:`_verify_snapshot` still refuses blobs outside ``blobs/``.
    """
    from huggingface_hub import file_download

    original = getattr(file_download, "_normalize_etag", None)
    if original is None:
        yield
        return

    def checked(etag: str | None) -> str | None:
        value = original(etag)
        if value is not None and not (COMMIT_RE.match(value) or SHA256_RE.match(value)):
            raise ValueError(f"the Hub sent ETag {value[:80]!r}, not a 40- or 64-hex hash; refusing to name a "
                             "cache file after it")
        return value

    with _ETAG_LOCK:
        file_download._normalize_etag = checked
        try:
            yield
        finally:
            file_download._normalize_etag = original


def _download_snapshot(spec: str, repo_id: str, commit: str, expected: dict[str, Digest], force: bool) -> Path:
    """``snapshot_download`` of one checked commit (so huggingface_hub never resolves a ref itself), then verified."""
    from huggingface_hub import snapshot_download

    try:
        with _hex_etags_only():
            folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=HUB_PATTERNS,
                                            endpoint=hub_endpoint(), etag_timeout=meta_timeout(),
                                            force_download=force))
    except Exception as exc:  # one clear line for every failure
        raise WeightsError(f"downloading {spec} (commit {commit[:12]}) failed: {_describe(exc)}; try again, "
                           "or " + WHAT_TO_DO.format(spec=spec)) from exc
    if folder.name != commit:
        raise WeightsError(f"downloading {spec} gave snapshot {folder.name[:80]!r}, not commit {commit}")
    _verify_snapshot(spec, repo_id, folder, commit, expected)
    return folder


# -- the official release origin (Google Drive) ------------------------------------------------

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


def download_deadline() -> float:
    """Seconds a whole official-release download may take (``SOFTCLI_DOWNLOAD_DEADLINE``, default 1800)."""
    return _env_seconds(DEADLINE_ENV, 1800.0)


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
                raise WeightsError(f"Google Drive answered with a page instead of file {file_id} (download quota "
                                   "exceeded, or the file is not public); download it in a browser and pass "
                                   "--weights FILE")
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


def _cached_origin(entry: RegistryEntry) -> ResolvedWeights | None:
    """A previous origin conversion, its sha256 checked now; None when there is none."""
    folder = origin_cache() / entry.name
    manifest = folder / ORIGIN_MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        expected = None
    weights = folder / WEIGHTS_NAME
    actual = sha256_file(weights) if weights.is_file() else None
    if expected is None or actual != expected:
        raise WeightsError(f"{folder}: cached weights fail their sha256 check (damaged or edited); "
                           f"run 'soft weights pull {entry.name} --force' to rebuild them")
    return ResolvedWeights(spec=entry.name, kind="registry", path=folder, source="origin", registry_name=entry.name,
                           sha256=actual)


def convert_origin(entry: RegistryEntry, checkpoint: Path, download_sha256: str) -> ResolvedWeights:
    """Store an official checkpoint converted, with the registry's architecture and a sha256 manifest.

    The registry decides what the weights cannot show (Norm vs plain attention,
    the stage-4 head count); every tensor shape is still checked against it.
    """
    folder = origin_cache() / entry.name
    origin = asdict(entry.origin) if entry.origin else {}
    convert_checkpoint(checkpoint, folder, name=entry.name, architecture=entry.architecture, repo_id=entry.hub.repo_id,
                       entry=entry, extra={"registry_name": entry.name, "converted_from": {
                           **origin, "file": checkpoint.name, "sha256": download_sha256}})
    record = {"name": entry.name, "origin": origin, "download_sha256": download_sha256,
              "weights_sha256": sha256_file(folder / WEIGHTS_NAME),
              "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_path(folder / ORIGIN_MANIFEST) as tmp:  # written last: it marks the conversion complete
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return ResolvedWeights(spec=entry.name, kind="registry", path=folder, source="origin", registry_name=entry.name,
                           sha256=record["weights_sha256"])


def _first_download_sha256(entry: RegistryEntry) -> str | None:
    """The official file's sha256 recorded when it was first downloaded here (for origins the registry has none).

    Once known, the file is pinned: a later download (``--force``) with other
    bytes is refused, just as a registry sha256 mismatch is.
    """
    try:
        digest = json.loads((origin_cache() / entry.name / ORIGIN_MANIFEST).read_text())["download_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and SHA256_RE.match(digest) else None


def fetch_origin(entry: RegistryEntry, progress: ProgressFn | None = None) -> ResolvedWeights:
    """Download, verify and convert a registry model from its official release."""
    o = entry.origin
    if o is None or not o.id:
        name = (o.official_name if o else None) or entry.name
        raise WeightsError(f"the Google Drive id of the official {name} checkpoint is not recorded in the "
                           "registry; download it from https://github.com/fudan-zvg/SOFT and pass --weights FILE "
                           "(or 'soft weights convert FILE --out DIR')")
    if o.kind != "gdrive":
        raise WeightsError(f"{entry.name}: origin kind {o.kind!r} cannot be downloaded by this softcli version")
    root = hf_home() / "softcli" / "downloads"
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{entry.name}-", dir=root))
    try:
        file = tmpdir / f"{o.official_name or entry.name}.{o.format}"
        gdrive_download(o.id, file, progress=progress)
        digest = sha256_file(file)
        first = "its first download (recorded in origin.json)"
        expected, source = (o.sha256, "the registry") if o.sha256 else (_first_download_sha256(entry), first)
        if expected and digest != expected.lower():
            raise WeightsError(f"{entry.name}: the file from Google Drive has sha256 {digest}, {source} says "
                               f"{expected}; refusing to use it")
        return convert_origin(entry, file, digest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# -- one entry point ----------------------------------------------------------------------

def resolve_registry(entry: RegistryEntry, *, download: bool = True, force: bool = False,
                     progress: ProgressFn | None = None) -> ResolvedWeights:
    """Weights for a registry name: softcli's Hub repo, else the converted official release."""
    if not force:
        cached = _cached_origin(entry)
        if cached:
            return cached
    hub = entry.hub
    try:
        folder, commit = pull_hub(hub.repo_id, hub.revision, force=force, local_only=not download)
        path = folder / hub.filename if (folder / hub.filename).is_file() else folder
        return ResolvedWeights(spec=entry.name, kind="registry", path=path, source="hub", repo_id=hub.repo_id,
                               revision=hub.revision, commit=commit, registry_name=entry.name)
    except HubUnavailable as exc:
        hub_error = exc
    if not download or is_offline():
        why = "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "downloads are off here"
        raise WeightsError(f"{entry.name}: its weights are not in the cache ({hub_cache()}) and {why}; "
                           + WHAT_TO_DO.format(spec=entry.name))
    try:
        return fetch_origin(entry, progress=progress)
    except WeightsError as exc:
        raise WeightsError(f"{entry.name}: {hub_error.reason}, and the official release could not be used "
                           f"either: {exc}; " + WHAT_TO_DO.format(spec=entry.name)) from None


def resolve_weights(spec: str | os.PathLike[str] | None, *, download: bool = True, force: bool = False,
                    progress: ProgressFn | None = None) -> ResolvedWeights:
    """Find (downloading when allowed) the weights a model spec names.

    ``None`` means the registry's default model; a ``Path`` object is always a
    local path. ``download=False`` never touches the network: the answer comes
    from the caches or fails.
    """
    registry = load_registry()
    if spec is None:
        spec = registry.default
    is_str = isinstance(spec, str)
    kind = spec_kind(spec, registry) if is_str else "path"  # a Path object is always a path
    spec = os.fspath(spec)
    if kind == "hub":
        repo_id, revision = parse_hub_spec(spec)
        folder, commit = pull_hub(repo_id, revision, force=force, local_only=not download)
        return ResolvedWeights(spec=spec, kind="hub", path=folder, source="hub", repo_id=repo_id,
                               revision=revision or "main", commit=commit)
    if kind == "registry":
        return resolve_registry(registry.get(spec), download=download, force=force, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        if not is_str or "/" in spec or os.sep in spec or path.suffix:
            raise CheckpointError(f"{path}: no such file or folder")
        raise WeightsError(f"unknown model {spec!r}: not a registry name (see 'soft weights list'), not "
                           "hf-hub:ORG/REPO, and no such file or folder")
    return ResolvedWeights(spec=spec, kind="path", path=path, source="local")


def is_cached(entry: RegistryEntry) -> bool:
    """Whether a registry model can be used without the network (no sha256 work done here)."""
    if (origin_cache() / entry.name / ORIGIN_MANIFEST).is_file():
        return True
    return _cached_snapshot(entry.hub.repo_id, entry.hub.revision) is not None


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Format, architecture, parameter count, labels and sha256 of a checkpoint file or folder."""
    ck = read_checkpoint(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    provenance = ck.extra.get("converted_from")
    return {"format": ck.format, "architecture": ck.config.to_dict(),
            "params": sum(int(t.numel()) for k, t in ck.state_dict.items() if "running_" not in k
                          and "num_batches_tracked" not in k),
            "labels": len(ck.labels) if ck.labels else 0, "pretrained_cfg": ck.pretrained_cfg,
            "weights_file": str(weights) if weights.is_file() else None,
            "sha256": sha256_file(weights) if weights.is_file() else None,
            **({"converted_from": provenance} if provenance else {}),
            **{k: ck.extra[k] for k in FITTED_KEYS if k in ck.extra}}


#: What a checkpoint made by ``soft fit`` adds to config.json (see softcli.fit), shown by ``soft weights info``.
FITTED_KEYS = ("task", "head", "class_names", "backbone", "fit")


def weights_info(spec: str) -> dict[str, Any]:
    """What a model spec is and whether it is usable offline; never touches the network."""
    registry = load_registry()
    out: dict[str, Any] = {"spec": spec, "kind": spec_kind(spec, registry)}
    if out["kind"] == "registry":
        out["registry"] = registry.get(spec).to_dict()
    try:
        res = resolve_weights(spec, download=False)
    except WeightsError:
        if out["kind"] == "path":
            raise
        out.update(cached=False, why=f"not in the cache; 'soft weights pull {spec}' downloads it")
    else:
        out.update(cached=res.source != "local", resolved=res.to_dict(), checkpoint=checkpoint_summary(res.path))
    return out


# -- the Hub repo folder: model card ----------------------------------------------------------

CARD_MARK = "<!-- written by softcli; 'soft weights push' rewrites it -->"


def model_card(folder: Path, name: str, *, repo_id: str | None = None, entry: RegistryEntry | None = None) -> str:
    """README.md text with Hub metadata (library, license, tags) describing the weights in ``folder``."""
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    mc = cfg.get("model_config", {})
    src = cfg.get("converted_from") or {}
    source = (f"the official release {src['official_name']}" if src.get("official_name") else
              f"`{src.get('file')}` ({src.get('format')})" if src.get("file") else "a softcli folder")
    if src.get("sha256"):
        source += f", sha256 `{src['sha256']}`"
    repo = repo_id or f"ORG/{name}"
    labels = cfg.get("labels")
    top1 = f"{entry.top1:.1f}%" if entry and entry.top1 is not None else "not reported"
    pre = cfg.get("pretrained_cfg", {})
    task = cfg.get("task") or "image-classification"
    if cfg.get("task"):  # a head fitted by 'soft fit': say what it is and where its backbone comes from
        ref = cfg.get("backbone")
        source += (f"\n- Task: {cfg['task']}, {(cfg.get('head') or {}).get('type')} head, classes "
                   f"{', '.join(cfg.get('class_names') or [])}\n- Backbone: " +
                   (f"`{ref.get('spec')}` (sha256 `{ref.get('sha256')}`), fetched when the model loads"
                    if isinstance(ref, dict) else "bundled in model.safetensors"))
        task = "image-segmentation" if cfg["task"] == "segmentation" else "image-classification"
    return f"""---
library_name: softcli
license: apache-2.0
pipeline_tag: {task}
tags:
- soft
- vision-transformer
- linear-attention
- image-classification
---
{CARD_MARK}

# {name}

SOFT (softmax-free transformer, linear-complexity attention) weights in the softcli
layout: `model.safetensors` (softcli's key layout, float32) and `config.json`
(architecture, labels, preprocessing).

- Architecture: `{mc.get("variant") or "custom"}`, embed dims {mc.get("embed_dims")}, depths {mc.get("depths")},
  heads {mc.get("num_heads")}, {"normalised" if mc.get("norm") else "plain"} SOFT attention,
  {mc.get("num_classes")} classes
- ImageNet-1k top-1 reported in the paper: {top1}
- Labels: {f"{len(labels)} class names in config.json" if labels else "none stored (class indices only)"}
- Preprocessing: resize/crop to {pre.get("input_size", [3, 224, 224])[1:]} ({pre.get("interpolation")}, crop
  {pre.get("crop_pct")}), mean {pre.get("mean")}, std {pre.get("std")}
- Converted from: {source}

## Use

```bash
pip install softcli
soft classify photo.jpg --model hf-hub:{repo}
```

```python
import softcli
model = softcli.load_model("hf-hub:{repo}")
```

## Credits

SOFT: Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021, and
"Softmax-free Linear Transformers", IJCV 2024. Official code and checkpoints: https://github.com/fudan-zvg/SOFT.
"""


def write_model_card(folder: Path, name: str, *, repo_id: str | None = None,
                     entry: RegistryEntry | None = None) -> Path:
    card = folder / "README.md"
    with atomic_path(card) as tmp:
        tmp.write_text(model_card(folder, name, repo_id=repo_id, entry=entry))
    return card


def _is_softcli_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("format") == "softcli"
    except (OSError, ValueError, AttributeError):
        return False


def _check_can_create(dest: Path) -> None:
    """Fail before any work when ``dest`` cannot be created: it is built next to itself and renamed in."""
    where = dest.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"{dest}: {where} is a file, not a folder")
    try:  # try it: os.access says yes to root even on read-only or special file systems
        Path(tempfile.mkdtemp(prefix=".soft-write-check-", dir=where)).rmdir()
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create files in folder {where} ({exc.strerror})") from exc


def convert_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       labels: list[str] | None = None, name: str | None = None,
                       architecture: dict[str, Any] | None = None, repo_id: str | None = None,
                       entry: RegistryEntry | None = None, extra: dict[str, Any] | None = None) -> Path:
    """An official ``.pth``/``.pth.tar``/``.safetensors`` (or softcli) checkpoint → a Hub-ready folder.

    ``architecture`` (a registry entry's) replaces what the file says or
    implies; the weights must still fit it tensor by tensor.
    """
    from .models import SoftConfig

    src, dest = Path(checkpoint), Path(out)
    if dest.exists() and (src.resolve() == dest.resolve() or dest.resolve() in src.resolve().parents):
        raise WeightsError(f"output folder {dest} holds the input checkpoint; choose another folder")
    if dest.exists() and not dest.is_dir():
        raise WeightsError(f"output folder {dest} is a file; give a folder")
    if dest.is_dir() and any(dest.iterdir()) and not _is_softcli_folder(dest):
        raise WeightsError(f"output folder {dest} has other files in it; give a new or empty folder")
    _check_can_create(dest)
    ck = read_checkpoint(src)
    if architecture:
        ck.config = SoftConfig.from_dict({**architecture, "num_classes": ck.config.num_classes})
    model = build_model(ck)
    if labels is not None and len(labels) != ck.config.num_classes:
        raise WeightsError(f"{len(labels)} labels given for a {ck.config.num_classes}-class checkpoint")
    with atomic_dir(dest) as tmp:
        provenance = {"file": src.name, "sha256": sha256_file(src), "format": ck.format}
        save_pretrained(model, tmp / "w", labels=labels if labels is not None else ck.labels,
                        pretrained_cfg=ck.pretrained_cfg, extra={"converted_from": provenance, **(extra or {})})
        for f in (tmp / "w").iterdir():
            f.rename(tmp / f.name)
        (tmp / "w").rmdir()
        write_model_card(tmp, name or dest.name, repo_id=repo_id, entry=entry)
    return dest


# -- publishing --------------------------------------------------------------------------------

def push_folder(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False,
                revision: str | None = None, message: str | None = None,
                verify: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Upload a softcli folder (weights, config, model card) to a Hub repo, creating the repo if needed.

    ``verify(folder)`` raises when the folder's model does not load; the
    default builds a classifier/backbone (``soft weights push`` passes one
    that also knows the heads ``soft fit`` writes).
    """
    src = Path(folder)
    if not src.is_dir() or not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise WeightsError(f"{src}: not a softcli folder ({WEIGHTS_NAME} + {CONFIG_NAME}); "
                           "make one with 'soft weights convert CHECKPOINT --out DIR'")
    if not _REPO_RE.match(repo_id):
        raise WeightsError(f"repo {repo_id!r}: expected ORG/NAME")
    if revision is not None and (revision_problem(revision) or COMMIT_RE.match(revision)):
        raise WeightsError(f"branch {revision!r}: not a branch name ({revision_problem(revision) or 'a commit id'})")
    if is_offline():
        raise WeightsError("HF_HUB_OFFLINE=1 is set; unset it to push")
    if verify is None:  # refuse to publish weights that do not load
        build_model(read_checkpoint(src))
    else:
        verify(src)
    from huggingface_hub import CommitOperationAdd, HfApi

    card = src / "README.md"
    if card.is_file() and CARD_MARK not in card.read_text(errors="replace"):
        card_op = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card))  # the user's own card
    else:  # ours (or none): regenerate it naming the real repo; the folder itself is left as it is
        text = model_card(src, repo_id.split("/")[1], repo_id=repo_id)
        card_op = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode())
    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(src / n)) for n in (WEIGHTS_NAME, CONFIG_NAME)]
    api = HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=[*ops, card_op], revision=revision,
                                 commit_message=message or "Upload SOFT weights (softcli)")
    except Exception as exc:  # noqa: BLE001 - one clear line for every failure
        from huggingface_hub.errors import HfHubHTTPError

        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else 0
        text = str(exc).lower()
        if status in (401, 403) or ("token" in text and ("not found" in text or "required" in text)):
            raise WeightsError("pushing needs a Hugging Face token with write access: set HF_TOKEN "
                               "(or run 'hf auth login')") from None
        raise WeightsError(f"pushing to hf-hub:{repo_id} on {hub_endpoint()} failed: {_describe(exc)}") from None
    return {"repo_id": repo_id, "commit": info.oid, "url": info.commit_url, "private": private,
            "spec": f"{HF_PREFIX}{repo_id}@{info.oid}"}
