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

When a registry model's Hub repo is missing or unreachable, its official
release (the Google Drive file the SOFT authors published) is downloaded,
checked against the registry's sha256 when one is recorded, converted to the
softcli layout and kept under ``$HF_HOME/softcli/origin/NAME`` with the sha256
of the converted weights, which is checked again on every later use.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, build_model, read_checkpoint, save_pretrained
from .errors import CheckpointError, SoftError
from .io.atomic import atomic_dir, atomic_path
from .registry import Registry, RegistryEntry, load_registry

HF_PREFIX = "hf-hub:"
#: What a pull fetches from a repo: the weights, our config and the model card.
HUB_PATTERNS = ["*.safetensors", CONFIG_NAME, "README.md"]
GDRIVE_ENV = "SOFTCLI_GDRIVE_ENDPOINT"
GDRIVE_DEFAULT = "https://drive.google.com"
GDRIVE_HOSTS = {"drive.google.com", "drive.usercontent.google.com"}
MAX_ORIGIN_BYTES = 4 * 1024**3  # the largest official SOFT checkpoint is well under 1 GB
ORIGIN_MANIFEST = "origin.json"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
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


def _cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str] | None:
    """The cached snapshot for a revision, without any network call."""
    storage = _storage_folder(repo_id)
    rev = revision or "main"
    commit = rev if _COMMIT_RE.match(rev) else None
    ref = storage / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None:
        return None
    folder = storage / "snapshots" / commit
    return (folder, commit) if _has_weights(folder) else None


def _record_ref(repo_id: str, revision: str, commit: str) -> None:
    """Remember revision → commit in the cache's refs/ so offline use finds the snapshot."""
    if revision == commit:
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
    """Download (or find in the cache) a repo snapshot; returns (folder, commit).

    Online, the revision is resolved to its commit first (one small request
    with a timeout), then the snapshot of that commit is fetched with
    ``snapshot_download``. A commit that is already cached needs no network.
    """
    spec = f"{HF_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    cached = _cached_snapshot(repo_id, revision)
    if cached and not force and (local_only or _COMMIT_RE.match(revision or "")):
        return cached
    offline = local_only or is_offline()
    if offline:
        if cached:
            return cached
        raise _not_cached(spec, "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "downloads are off here")

    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, timeout=meta_timeout())
        commit = str(info.sha)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line below
        if _classify(exc) == "missing":
            msg = _missing_message(repo_id, revision, exc)
            raise HubUnavailable(msg, msg) from None
        if cached:
            return cached
        raise _not_cached(spec, f"the Hub at {hub_endpoint()} cannot be reached ({_describe(exc)})") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=HUB_PATTERNS, endpoint=hub_endpoint(),
                                        etag_timeout=meta_timeout(), force_download=force))
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"downloading {spec} (commit {commit[:12]}) failed: {_describe(exc)}; try again, "
                           "or " + WHAT_TO_DO.format(spec=spec)) from None
    _record_ref(repo_id, revision or "main", commit)
    if not _has_weights(folder):
        raise WeightsError(f"{spec} (commit {commit[:12]}) holds no .safetensors weights; a softcli repo has "
                           f"{WEIGHTS_NAME} + {CONFIG_NAME} (see 'soft weights convert')")
    return folder, commit


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


def gdrive_download(file_id: str, dest: Path, *, endpoint: str | None = None, progress: ProgressFn | None = None,
                    max_bytes: int = MAX_ORIGIN_BYTES) -> None:
    """Download a public Google Drive file, following the confirm page large files get.

    Only Drive's own hosts (or the configured endpoint's host) are followed;
    every request has a timeout; the size is capped; ``dest`` appears only
    when the download is complete.
    """
    base = (endpoint or os.environ.get(GDRIVE_ENV) or GDRIVE_DEFAULT).rstrip("/")
    allowed = GDRIVE_HOSTS | {urlsplit(base).netloc}
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    url = f"{base}/uc?" + urlencode({"export": "download", "id": file_id})
    for _ in range(3):
        if urlsplit(url).netloc not in allowed or urlsplit(url).scheme not in ("http", "https"):
            raise WeightsError(f"Google Drive sent the download of {file_id} to an unexpected host ({url[:80]})")
        try:
            resp = opener.open(urllib.request.Request(url, headers={"User-Agent": "softcli"}),
                               timeout=download_timeout())
        except urllib.error.HTTPError as exc:
            detail = "no such file or not shared publicly" if exc.code == 404 else f"HTTP {exc.code}"
            raise WeightsError(f"Google Drive file {file_id}: {detail} ({base})") from None
        except OSError as exc:  # URLError, timeouts, resets
            reason = getattr(exc, "reason", exc)
            raise WeightsError(f"cannot reach Google Drive at {base} ({reason})") from None
        with resp:
            if resp.headers.get_content_type() != "text/html":
                _stream(resp, dest, progress, max_bytes, file_id)
                return
            page = resp.read(2 * 1024 * 1024).decode("utf-8", "replace")
        url = _confirm_url(page, base, file_id, jar) or ""
        if not url:
            raise WeightsError(f"Google Drive answered with a page instead of file {file_id} (download quota "
                               "exceeded, or the file is not public); download it in a browser and pass --weights FILE")
    raise WeightsError(f"Google Drive kept asking to confirm the download of {file_id}")


def _stream(resp: Any, dest: Path, progress: ProgressFn | None, max_bytes: int, file_id: str) -> None:
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > max_bytes:
        raise WeightsError(f"Google Drive file {file_id} is {total} bytes, over the {max_bytes}-byte limit")
    done = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        while chunk := resp.read(1024 * 1024):
            done += len(chunk)
            if done > max_bytes:
                raise WeightsError(f"Google Drive file {file_id} is over the {max_bytes}-byte limit")
            fh.write(chunk)
            if progress:
                progress(done, total)
        fh.flush()
        if total is not None and done != total:
            raise WeightsError(f"Google Drive file {file_id}: connection closed after {done} of {total} bytes")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


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
        if o.sha256 and digest != o.sha256.lower():
            raise WeightsError(f"{entry.name}: the file from Google Drive has sha256 {digest}, the registry expects "
                               f"{o.sha256}; refusing to use it")
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
        raise WeightsError(f"--out {dest} holds the input checkpoint; choose another folder")
    if dest.exists() and not dest.is_dir():
        raise WeightsError(f"--out {dest} is a file; give a folder")
    if dest.is_dir() and any(dest.iterdir()) and not _is_softcli_folder(dest):
        raise WeightsError(f"--out {dest} is a folder with other files in it; give a new or empty folder")
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
        raise WeightsError(f"--repo {repo_id!r}: expected ORG/NAME")
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
