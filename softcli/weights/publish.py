"""Publishing: an official checkpoint converted to a Hub-ready softcli folder, and that folder pushed.

The model card is a template shipped with the package (``model_card.md``,
``string.Template`` placeholders) filled from the folder's ``config.json``.
torch is imported only when a model is built (converting, verifying a push).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from ..errors import HubAuthError, NotASoftcliFolder, OutputError, WeightsError
from ..io.atomic import atomic_dir, atomic_path
from ..io.hashing import sha256_file
from .config import hub_endpoint, is_offline
from .hf import CONFIG_NAME, WEIGHTS_NAME, describe_failure
from .registry import COMMIT_RE, RegistryEntry, revision_problem
from .spec import HF_PREFIX, REPO_RE

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
    labels = cfg.get("labels")
    pre = cfg.get("pretrained_cfg", {})
    task = cfg.get("task") or "image-classification"
    if cfg.get("task"):  # a head fitted by 'soft fit': say what it is and where its backbone comes from
        ref = cfg.get("backbone")
        source += (f"\n- Task: {cfg['task']}, {(cfg.get('head') or {}).get('type')} head, classes "
                   f"{', '.join(cfg.get('class_names') or [])}\n- Backbone: " +
                   (f"`{ref.get('spec')}` (sha256 `{ref.get('sha256')}`), fetched when the model loads"
                    if isinstance(ref, dict) else "bundled in model.safetensors"))
        task = "image-segmentation" if cfg["task"] == "segmentation" else "image-classification"
    template = Template((resources.files(__package__) / "model_card.md").read_text(encoding="utf-8"))
    return template.substitute(
        pipeline_tag=task, card_mark=CARD_MARK, name=name, repo=repo_id or f"ORG/{name}",
        variant=mc.get("variant") or "custom", embed_dims=mc.get("embed_dims"), depths=mc.get("depths"),
        num_heads=mc.get("num_heads"), attention="normalised" if mc.get("norm") else "plain",
        num_classes=mc.get("num_classes"),
        top1=f"{entry.top1:.1f}%" if entry and entry.top1 is not None else "not reported",
        labels=f"{len(labels)} class names in config.json" if labels else "none stored (class indices only)",
        input_size=pre.get("input_size", [3, 224, 224])[1:], interpolation=pre.get("interpolation"),
        crop_pct=pre.get("crop_pct"), mean=pre.get("mean"), std=pre.get("std"), source=source)


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
    from ..checkpoint import build_model, read_checkpoint, save_pretrained
    from ..models import SoftConfig

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
        raise NotASoftcliFolder(f"{src}: not a softcli folder ({WEIGHTS_NAME} + {CONFIG_NAME})")
    if not REPO_RE.match(repo_id):
        raise WeightsError(f"repo {repo_id!r}: expected ORG/NAME")
    if revision is not None and (revision_problem(revision) or COMMIT_RE.match(revision)):
        raise WeightsError(f"branch {revision!r}: not a branch name ({revision_problem(revision) or 'a commit id'})")
    if is_offline():
        raise WeightsError("HF_HUB_OFFLINE=1 is set; unset it to push")
    if verify is None:  # refuse to publish weights that do not load
        from ..checkpoint import build_model, read_checkpoint

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
    except Exception as exc:
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else 0
        if status in (401, 403) or isinstance(exc, LocalTokenNotFoundError):
            # ``from None``: the Hub's answer and huggingface_hub's message can echo request headers
            # (the token); --debug must not print them.
            raise HubAuthError("pushing needs a Hugging Face token with write access: set HF_TOKEN "
                               "(or run 'hf auth login')") from None
        raise WeightsError(f"pushing to hf-hub:{repo_id} on {hub_endpoint()} failed: "
                           f"{describe_failure(exc)}") from exc
    return {"repo_id": repo_id, "commit": info.oid, "url": info.commit_url, "private": private,
            "spec": f"{HF_PREFIX}{repo_id}@{info.oid}"}
