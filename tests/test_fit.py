"""``soft fit segment|classify``: heads for the user's own classes on frozen SOFT features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from softcli.backbone_ref import check_publishable
from softcli.checkpoint import read_checkpoint, save_pretrained
from softcli.errors import CheckpointError, InputError, UsageError
from softcli.fit import fit_classifier, fit_segmenter
from softcli.fit.common import verify_loadable
from softcli.segment import load_segmenter

from .fit_synthetic import (
    CLASSIFY_CLASSES,
    scribbles,
    texture_scene,
    write_image_folder,
)
from .hub_server import hf  # noqa: F401 - a fixture
from .synthetic import ONE_THREAD_ENV, iou_per_class, single_thread  # noqa: F401 - a fixture

GOLDEN_TINY = "soft_tiny.weights.safetensors"
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster


def _write_pair(root: Path, stem: str, img: np.ndarray, labels: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "images" / f"{stem}.png")
    Image.fromarray(labels.astype(np.uint8)).save(root / "labels" / f"{stem}.png")


@pytest.fixture
def tiny_backbone(tmp_path: Path, tiny_model) -> Path:
    """A TINY_CONFIG backbone saved as a softcli folder (fast; random weights)."""
    return save_pretrained(tiny_model, tmp_path / "tiny-backbone")


def _small_data(root: Path, sizes=((96, 96),), seed: int = 0) -> Path:
    """Texture scenes with scribbles; one image per size."""
    for i, (h, w) in enumerate(sizes):
        img, gt = texture_scene(h, w, seed=seed + i)
        _write_pair(root, f"img{i}", img, scribbles(gt, seed=seed + i, per_class=4, length=30, margin=4))
    (root / "classes.json").write_text(json.dumps(["stripes", {"name": "dots", "color": "#00ff00"}, "blotches"]))
    return root


# -- the must-show tests -----------------------------------------------------------------------

def test_fit_segment_scribbles_then_segment_another_image(soft, golden, tmp_path):
    """3 grey textures within 20 levels, scribbles on < 2 % of pixels → mean IoU ≥ 0.8 on a different scene."""
    data = tmp_path / "data"
    img, gt = texture_scene(512, 512, seed=1)
    labels = scribbles(gt, seed=1, per_class=10, length=60, margin=8)
    assert 0 < (labels > 0).mean() < 0.02
    assert int(img.max()) - int(img.min()) <= 20 + 4 * 6  # 18-level textures plus sensor noise
    _write_pair(data, "scene", img, labels)
    (data / "classes.json").write_text(json.dumps(["stripes", "dots", "blotches"]))
    test_img, test_gt = texture_scene(512, 512, seed=2)
    Image.fromarray(test_img).save(tmp_path / "other.png")

    model = tmp_path / "textures"
    fit = soft("fit", "segment", data, "--out", model, "--weights", golden / GOLDEN_TINY, "--val", "0",
               "--device", "cpu", "--json", env=ONE_THREAD_ENV)
    assert fit.returncode == 0, fit.stderr.decode()
    summary = json.loads(fit.stdout)
    assert summary["classes"] == ["stripes", "dots", "blotches"]
    assert summary["backbone"]["bundled"] is False and len(summary["backbone"]["sha256"]) == 64
    assert summary["train"]["accuracy"] > 0.9
    # the folder holds the head only; the backbone is referenced by sha256
    assert (model / "model.safetensors").stat().st_size < 10_000
    seg = soft("segment", tmp_path / "other.png", "--model", model, "--out", tmp_path / "pred.npy", "--json",
               "--device", "cpu", env=ONE_THREAD_ENV)
    assert seg.returncode == 0, seg.stderr.decode()
    names = [e["name"] for e in json.loads(seg.stdout)["labels"]]
    assert names == ["stripes", "dots", "blotches"]
    ious = iou_per_class(np.load(tmp_path / "pred.npy"), test_gt, 3)
    assert np.mean(ious) >= 0.8, ious

    info = soft("weights", "info", str(model))
    assert info.returncode == 0, info.stderr.decode()
    text = info.stdout.decode()
    assert "task segmentation: linear head, 3 classes (stripes, dots, blotches)" in text
    assert summary["backbone"]["sha256"] in text


def test_fit_classify_probe_and_classify_with_new_names(soft, golden, tmp_path):
    """4 classes x 20 images: held-out accuracy ≥ 0.9, and soft classify --model DIR speaks the new names."""
    write_image_folder(tmp_path / "train", per_class=20, seed=0)
    write_image_folder(tmp_path / "test", per_class=3, seed=1)
    model = tmp_path / "probe"
    fit = soft("fit", "classify", tmp_path / "train", "--out", model, "--weights", golden / GOLDEN_TINY, "--json",
               "--device", "cpu")
    assert fit.returncode == 0, fit.stderr.decode()
    summary = json.loads(fit.stdout)
    assert summary["images"] == {"train": 64, "val": 16}
    assert summary["val"]["accuracy"] >= 0.9, summary["val"]["confusion"]
    assert np.asarray(summary["val"]["confusion"]).sum() == 16

    out = soft("classify", tmp_path / "test", "--model", model, "--json", "-k", "1", "--device", "cpu")
    assert out.returncode == 0, out.stderr.decode()
    results = json.loads(out.stdout)
    assert len(results) == 12
    labels = [r["predictions"][0]["label"] for r in results]
    assert set(labels) <= set(CLASSIFY_CLASSES)
    right = sum(Path(r["image"]).parent.name == label for r, label in zip(results, labels))
    assert right / len(results) >= 0.9


# -- bad input: one clear error line each ------------------------------------------------------

def _one_error_line(proc) -> str:
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in proc.stderr.decode()
    return err[0]


def _bad_data(kind: str, root: Path) -> None:
    img, gt = texture_scene(64, 64, seed=0)
    labels = (gt + 1).astype(np.uint8)
    if kind == "size":
        _write_pair(root, "a", img, labels[:48])
    elif kind == "too_many":
        labels[0, 0] = 3
        _write_pair(root, "a", img, labels)
        (root / "classes.json").write_text(json.dumps(["a", "b"]))
    elif kind == "unlabelled":
        _write_pair(root, "a", img, np.zeros_like(labels))
    elif kind == "one_class":
        _write_pair(root, "a", img, np.where(labels > 0, 2, 0))
    elif kind == "rgb_labels":
        _write_pair(root, "a", img, labels)
        Image.fromarray(np.repeat(labels[:, :, None], 3, 2)).save(root / "labels" / "a.png")
    elif kind == "no_label_file":
        _write_pair(root, "a", img, labels)
        (root / "labels" / "a.png").unlink()


@pytest.mark.parametrize("kind, words", [
    ("size", "they must be the same size"),
    ("too_many", "label 3 found, but classes.json names 2 classes"),
    ("unlabelled", "no labelled pixels"),
    ("one_class", "only one class is labelled"),
    ("rgb_labels", "must be single-channel"),
    ("no_label_file", "no label image"),
])
def test_fit_segment_bad_input_is_one_error_line(soft, tmp_path, kind, words):
    _bad_data(kind, tmp_path / "data")
    line = _one_error_line(soft("fit", "segment", tmp_path / "data", "--out", tmp_path / "m"))
    assert words in line
    assert not (tmp_path / "m").exists()


def test_fit_classify_one_class_and_out_over_data_are_errors(soft, tmp_path):
    write_image_folder(tmp_path / "one", per_class=2)
    for name in CLASSIFY_CLASSES[1:]:
        shutil.rmtree(tmp_path / "one" / name)
    assert "a classifier needs at least two" in _one_error_line(
        soft("fit", "classify", tmp_path / "one", "--out", tmp_path / "m"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    write_image_folder(tmp_path / "two", per_class=2)
    assert "other files in it" in _one_error_line(
        soft("fit", "classify", tmp_path / "two", "--out", tmp_path / "busy"))


# -- checkpoints: reference, bundle, determinism, other heads --------------------------------------

def test_head_only_checkpoint_checks_backbone_sha256(tmp_path, tiny_backbone, tiny_model):
    data = _small_data(tmp_path / "data")
    out = tmp_path / "m"
    summary = fit_segmenter(data, out, weights=tiny_backbone, val=0, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["head"]["type"] == "linear"
    assert cfg["backbone"]["sha256"] == summary["backbone"]["sha256"]
    assert cfg["palette"][1] == [0, 255, 0]  # from classes.json
    model, info = load_segmenter(out)
    assert info.class_names == ["stripes", "dots", "blotches"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    # other weights at the referenced path: refused, with the reason
    torch.manual_seed(1)
    save_pretrained(type(tiny_model)(tiny_model.config), tiny_backbone)
    with pytest.raises(CheckpointError, match="sha256"):
        load_segmenter(out)


def test_bundle_needs_no_backbone_file_and_seed_is_deterministic(tmp_path, tiny_backbone):
    data = _small_data(tmp_path / "data", sizes=((96, 96), (64, 128)))  # sizes may differ
    fit_segmenter(data, tmp_path / "a", weights=tiny_backbone, seed=3, val=0.5)
    fit_segmenter(data, tmp_path / "b", weights=tiny_backbone, seed=3, val=0.5)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = fit_segmenter(data, tmp_path / "bundled", weights=tiny_backbone, seed=3, val=0.5, bundle=True)
    assert summary["held_out"] and summary["val"] is not None
    shutil.rmtree(tiny_backbone)
    _, info = load_segmenter(tmp_path / "bundled")
    assert info.class_names == ["stripes", "dots", "blotches"]
    assert "backbone" not in json.loads((tmp_path / "bundled" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="cannot be found|no such file"):
        load_segmenter(tmp_path / "a")


def test_fpn_head_trains_and_segments(tmp_path, tiny_backbone):
    data = _small_data(tmp_path / "data")
    summary = fit_segmenter(data, tmp_path / "fpn", weights=tiny_backbone, head="fpn", steps=3, val=0)
    assert summary["head"]["type"] == "semantic_fpn" and summary["fit"]["steps"] == 3
    model, _ = load_segmenter(tmp_path / "fpn")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_validation_split_must_leave_every_class_to_fit(tmp_path, tiny_backbone):
    root = tmp_path / "data"
    img, gt = texture_scene(64, 64, seed=0)
    _write_pair(root, "a", img, np.where(gt == 0, 1, 0))
    _write_pair(root, "b", img, np.where(gt == 1, 2, 0))
    with pytest.raises(UsageError, match="no labelled pixels left to fit on"):
        fit_segmenter(root, tmp_path / "m", weights=tiny_backbone, val=0.5)


def test_publishing_needs_a_portable_backbone(tmp_path, tiny_backbone):
    write_image_folder(tmp_path / "data", per_class=3)
    fit_classifier(tmp_path / "data", tmp_path / "probe", weights=tiny_backbone, val=0)
    with pytest.raises(CheckpointError, match="nobody else can fetch"):
        check_publishable(read_checkpoint(tmp_path / "probe"))
    fit_classifier(tmp_path / "data", tmp_path / "bundled", weights=tiny_backbone, val=0, bundle=True)
    verify_loadable(tmp_path / "bundled")  # a bundled folder loads on its own
    ck = read_checkpoint(tmp_path / "bundled")
    assert ck.labels == sorted(CLASSIFY_CLASSES) and ck.config.num_classes == 4  # folders in name order


def test_label_values_above_classes_json_are_input_errors(tmp_path, tiny_backbone):
    root = tmp_path / "data"
    _bad_data("too_many", root)
    with pytest.raises(InputError, match="label 3 found"):
        fit_segmenter(root, tmp_path / "m", weights=tiny_backbone)


def test_hub_backbone_reference_survives_push_and_pull(tmp_path, tiny_backbone, hf):  # noqa: F811 - fixture
    """Fit on hf-hub:ORG/REPO, push the head-only folder, pull it elsewhere: the backbone comes from the Hub."""
    from softcli import weights

    from .hub_server import FakeHub

    with FakeHub() as server:
        commit = server.add_commit("acme/tiny", {p.name: p.read_bytes() for p in tiny_backbone.iterdir()})
        hf(server.url, HF_TOKEN="hf_test_token")
        out = tmp_path / "seg"
        fit_segmenter(_small_data(tmp_path / "data"), out, weights="hf-hub:acme/tiny", val=0)
        ref = json.loads((out / "config.json").read_text())["backbone"]
        assert ref["kind"] == "hub" and ref["spec"] == f"hf-hub:acme/tiny@{commit}"
        pushed = weights.push_folder(out, "acme/textures", verify=verify_loadable)
        hf(server.url, home=tmp_path / "elsewhere", HF_TOKEN="hf_test_token")  # an empty cache
        model, info = load_segmenter(weights.resolve_weights(pushed["spec"]).path)
        assert info.class_names == ["stripes", "dots", "blotches"]
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
