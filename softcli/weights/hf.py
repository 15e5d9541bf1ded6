"""The Hugging Face Hub: a repo snapshot downloaded into huggingface_hub's cache, every file hash-checked.

``snapshot_download`` owns the cache (its ``blobs/``, ``snapshots/`` and
offline lookups); softcli adds the steps a hostile server or a poisoned cache
would otherwise get past, each explained where it is done:

- the revision is resolved to a commit by softcli (the answer must be 40 hex)
  and ``snapshot_download`` is given that exact commit, so huggingface_hub
  never writes ``refs/`` from an unchecked answer (:func:`_record_ref`);
- a file's ETag must be a hash while softcli downloads (:func:`_hex_etags_only`);
- every file is checked against the hash the Hub's listing advertises (LFS
  sha256, or the git blob id), and cached files again on every use
  (:func:`_verify_snapshot`); a file that fails is deleted.

Every network call has a timeout (``HF_HUB_ETAG_TIMEOUT`` /
``HF_HUB_DOWNLOAD_TIMEOUT`` seconds, default 10), and an unreachable Hub falls
back to the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import (
    HubNotCached,
    HubUnavailable,
    NotASoftcliFolder,
    TamperedFile,
    UnverifiableFile,
    WeightsError,
    WeightsNotCached,
)
from ..io.atomic import atomic_path
from ..io.hashing import hash_file, sha256_file
from .config import hf_home, hub_cache, hub_endpoint, is_offline, meta_timeout
from .registry import COMMIT_RE, SHA256_RE, revision_problem
from .spec import check_commit, check_revision, hub_spec

#: softcli's files (softcli.checkpoint.WEIGHTS_NAME / CONFIG_NAME), spelled out so that listing and
#: resolving weights never imports torch (tests/test_hub.py checks they agree).
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: What a pull fetches from a repo: the weights, our config and the model card.
HUB_PATTERNS = ["*.safetensors", CONFIG_NAME, "README.md"]


def not_cached(spec: str, reason: str) -> HubNotCached:
    return HubNotCached(f"{spec} is not in the cache ({hub_cache()}) and {reason}", reason, spec=spec)


def _storage_folder(repo_id: str) -> Path:
    """The repo's folder in huggingface_hub's cache (its own naming: models--ORG--NAME)."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


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
                               "download a file that cannot be verified", spec=spec)
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
                               "folder; the link was deleted and is not used", spec=spec)
        digest = reference.get(file.name) or _blob_digest(file, storage)
        if digest is None:
            raise UnverifiableFile(f"{spec}: {file} has no recorded hash to check it against; it must be "
                                   "downloaded again, verified", spec=spec)
        actual = _file_digest(file, digest[0])
        if actual != digest[1]:
            _discard(file, storage)
            raise TamperedFile(f"{spec} (commit {commit[:12]}): {file.name} has {digest[0]} {actual}, expected "
                               f"{digest[1]}; the file was deleted and is not used", spec=spec)


def cached_snapshot(repo_id: str, revision: str) -> tuple[Path, str] | None:
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


def describe_failure(exc: BaseException) -> str:
    """A short, user-readable reason for a failed network call."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} from {urlsplit(str(exc.response.url)).netloc}"
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(_timed_out(x) for x in chain):
        return f"no answer within {meta_timeout():g} s"
    if any(isinstance(x, ConnectionRefusedError) for x in chain):
        return "connection refused"
    if any(isinstance(x, socket.gaierror) for x in chain):
        return "host name not found"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:160]}" if first else type(exc).__name__


def _timed_out(exc: BaseException) -> bool:
    """A socket timeout, or the HTTP client's timeout type: ``httpx.TimeoutException`` (or the fork
    huggingface_hub vendors, same class name) and ``requests.Timeout``, matched by class so that
    softcli depends on none of them."""
    return isinstance(exc, TimeoutError) or any(t.__name__ in ("TimeoutException", "Timeout")
                                                for t in type(exc).__mro__)


def _classify(exc: BaseException) -> str:
    """``missing`` (repo or revision absent / no access) or ``unreachable`` (network, server error)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
    return f"no model repo hf-hub:{repo_id} on {where} ({describe_failure(exc)}){token}"


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
    spec = hub_spec(repo_id, revision)
    revision = check_revision(spec, revision or "main")
    pinned = bool(COMMIT_RE.match(revision))
    offline = local_only or is_offline()
    cached = None if force and not offline else cached_snapshot(repo_id, revision)
    if cached and (offline or pinned):
        try:
            _verify_snapshot(spec, repo_id, *cached)
            return cached
        except TamperedFile:
            if offline:
                raise
            cached = None  # online: fetch it again below
    if offline:
        raise not_cached(spec, "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "downloads are off here")

    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, files_metadata=True,
                                                         timeout=meta_timeout())
    except Exception as exc:  # every failure becomes one clear line below
        if _classify(exc) == "missing":
            msg = _missing_message(repo_id, revision, exc)
            raise HubUnavailable(msg, msg, spec=spec) from exc
        if cached:
            _verify_snapshot(spec, repo_id, *cached)
            return cached
        raise not_cached(spec, f"the Hub at {hub_endpoint()} cannot be reached ({describe_failure(exc)})") from exc
    commit = check_commit(spec, info.sha)
    expected = _advertised_digests(spec, info.siblings)
    try:
        folder = _download_snapshot(spec, repo_id, commit, expected, force)
    except TamperedFile:
        # The cache may have held a bad copy (it is deleted now): one fresh download, checked again.
        folder = _download_snapshot(spec, repo_id, commit, expected, force)
    _record_ref(repo_id, revision, commit)
    _record_digests(repo_id, commit, expected)
    if not _has_weights(folder):
        raise NotASoftcliFolder(f"{spec} (commit {commit[:12]}) holds no .safetensors weights; a softcli repo has "
                                f"{WEIGHTS_NAME} + {CONFIG_NAME}", spec=spec)
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
    except Exception as exc:
        raise WeightsNotCached(f"downloading {spec} (commit {commit[:12]}) failed: {describe_failure(exc)}",
                               spec=spec) from exc
    if folder.name != commit:
        raise WeightsError(f"downloading {spec} gave snapshot {folder.name[:80]!r}, not commit {commit}", spec=spec)
    _verify_snapshot(spec, repo_id, folder, commit, expected)
    return folder

