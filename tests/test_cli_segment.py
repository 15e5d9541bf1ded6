"""``soft segment`` as a user runs it: trained head, clusters, outputs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import softcli
from softcli.checkpoint import save_pretrained

from .conftest import TINY_CONFIG, run_soft, run_soft_subprocess
from .synthetic import (ONE_THREAD_ENV, best_match_miou, iou_per_class, make_trained_checkpoint,  # noqa: F401
                        regions_image, single_thread)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return softcli.create_model(TINY_CONFIG, num_classes=0).eval()


@pytest.fixture(scope="module")
def trained(backbone, tmp_path_factory):
    return make_trained_checkpoint(backbone, tmp_path_factory.mktemp("cli-seg"))


def test_help_has_example():
    """A smoke test of the real process (``python -m softcli``); the other CLI tests run in-process."""
    r = run_soft_subprocess("segment", "--help")
    assert r.returncode == 0 and b"Example: soft segment" in r.stdout


def test_trained_head_gives_expected_mask(trained, tmp_path):
    """A head trained in the test for a few dozen steps, saved, and run from the command line."""
    _, ckpt, png, gt = trained
    out = tmp_path / "mask.png"
    r = run_soft("segment", png, "--weights", ckpt, "--out", out, "--json", "--device", "cpu",
                 env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)  # one clean JSON document
    mask = np.asarray(Image.open(out))
    assert mask.shape == gt.shape
    assert min(iou_per_class(mask, gt, 3)) >= 0.9
    legend = json.loads((tmp_path / "mask.legend.json").read_text())
    assert [e["name"] for e in legend["labels"]] == ["stripes", "noise", "checker"]
    assert [e["color"] for e in legend["labels"]] == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]
    assert Image.open(out).getpalette()[:9] == [255, 0, 0, 0, 0, 255, 0, 255, 0]
    assert summary["labels"] == legend["labels"] and summary["mode"] == "head"


def test_clusters_to_pyramidal_tiff(backbone, tmp_path):
    img, gt = regions_image(256, 256)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.round(img * 255).astype(np.uint8), tile=(64, 64), photometric="rgb")
    ckpt = save_pretrained(backbone, tmp_path / "bb")
    out, overlay = tmp_path / "mask.tif", tmp_path / "overlay.jpg"
    r = run_soft("segment", src, "-w", ckpt, "--clusters", "3", "--out", out, "--overlay", overlay,
                 "--device", "cpu", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    assert b"3 labels (clusters)" in r.stdout
    with tifffile.TiffFile(out) as tif:
        page = tif.series[0].levels[0].keyframe
        assert page.is_tiled and page.compression.name == "ADOBE_DEFLATE"
        mask = tif.series[0].asarray()
    assert mask.shape == gt.shape and mask.dtype == np.uint8
    assert best_match_miou(mask, gt, 3) >= 0.9
    assert Image.open(overlay).size == (256, 256)
    assert (tmp_path / "mask.legend.json").is_file()


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_user_errors(trained, backbone, tmp_path, capsys):
    """One ``error:`` line and the right exit code (run in-process through ``main``: same code, no startup)."""
    from softcli.cli.app import main

    _, ckpt, png, _ = trained
    plain = save_pretrained(backbone, tmp_path / "plain")
    cases = [
        (["--weights", ckpt, "--out", tmp_path / "missing" / "m.png"], 1, "does not exist"),
        (["--weights", ckpt, "--out", png], 1, "input"),
        (["--weights", ckpt, "--out", tmp_path / "m.bmp"], 2, ".png, .tif/.tiff or .npy"),
        (["--weights", plain, "--out", tmp_path / "m.png"], 1, "--clusters"),
        (["--weights", ckpt, "--model", "x", "--out", tmp_path / "m.png"], 2, "not both"),
        (["--weights", ckpt, "--out", tmp_path / "m.png", "--tile", "100"], 2, "multiple of 32"),
    ]
    capsys.readouterr()
    for args, code, text in cases:
        with pytest.raises(SystemExit) as exc:
            main(["segment", str(png), *map(str, args)])
        err = capsys.readouterr().err
        assert exc.value.code == code, (args, err)
        assert text in _one_error_line(err), args
    assert not list(tmp_path.glob("m.*"))
