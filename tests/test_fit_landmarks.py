"""``--landmarks`` on ``soft fit``: the policy of the training features is kept with the head and used by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import softcli
from softcli.fit import fit_classifier, fit_segmenter
from softcli.models import LandmarkPolicy
from softcli.segment import segment

from .fit_synthetic import write_image_folder
from .test_fit import _small_data


@pytest.fixture
def backbone_dir(tmp_path: Path) -> Path:
    from .conftest import TINY_CONFIG

    torch.manual_seed(0)
    return softcli.save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=0), tmp_path / "backbone")


def test_fit_classify_keeps_its_landmarks_and_classify_uses_them(tmp_path, backbone_dir, soft):
    write_image_folder(tmp_path / "data", per_class=2)
    probe = tmp_path / "probe"
    r = soft("fit", "classify", tmp_path / "data", "--out", probe, "--weights", backbone_dir, "--val", "0",
             "--landmarks", "4", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["landmarks"] == "budget:4"
    assert json.loads((probe / "config.json").read_text())["landmarks"] == "budget:4"

    fitted = softcli.load_model(probe)
    assert fitted.landmark_policy == LandmarkPolicy("budget", 4) and fitted.landmarks_source == "fitted"
    asked = softcli.load_model(probe, landmarks="official")
    assert asked.landmark_policy == LandmarkPolicy("official") and asked.landmarks_source == "asked"
    assert asked.fitted_landmarks == LandmarkPolicy("budget", 4)

    image = next((tmp_path / "data").rglob("*.png"))
    r = soft("classify", image, "--model", probe)
    assert r.returncode == 0 and "landmarks budget:4 (as the head was fitted)" in r.stderr.decode()
    r = soft("classify", image, "--model", probe, "--landmarks", "official")
    assert r.returncode == 0
    assert "landmarks official (--landmarks; the head was fitted with budget:4)" in r.stderr.decode()


def test_fit_segment_keeps_its_landmarks_and_segment_uses_them(tmp_path, backbone_dir, soft):
    data = _small_data(tmp_path / "data")
    head = tmp_path / "head"
    summary = fit_segmenter(data, head, weights=backbone_dir, val=0, landmarks=4)
    assert summary["landmarks"] == "budget:4"
    image = next((data / "images").iterdir())
    done = segment(image, tmp_path / "m.png", weights=head)
    assert done["landmarks"] == {"policy": "budget:4", "source": "fitted"}
    done = segment(image, tmp_path / "m2.png", weights=head, landmarks="auto")
    assert done["landmarks"] == {"policy": "auto:196", "source": "asked", "fitted": "budget:4"}
    r = soft("segment", image, "--model", head, "--out", tmp_path / "m3.png", "--landmarks", "8", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["landmarks"] == {"policy": "budget:8", "source": "asked", "fitted": "budget:4"}
    # Without --landmarks at fit time the default is recorded, so a later change of default cannot drift the head.
    plain = fit_segmenter(data, tmp_path / "plain", weights=backbone_dir, val=0)
    assert plain["landmarks"] == "auto:196"
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["landmarks"] == "auto:196"
    assert segment(image, tmp_path / "m4.png", weights=tmp_path / "plain")["landmarks"]["source"] == "fitted"


def test_a_bad_landmarks_value_fails_before_fitting(tmp_path, backbone_dir, soft):
    write_image_folder(tmp_path / "data", per_class=2)
    r = soft("fit", "classify", tmp_path / "data", "--out", tmp_path / "probe", "--weights", backbone_dir,
             "--landmarks", "many")
    assert (r.returncode, r.stderr.decode()) == (
        2, "error: --landmarks takes auto, official or a positive number, not 'many'\n")
    assert not (tmp_path / "probe").exists()
    with pytest.raises(softcli.errors.ParameterError, match="^landmarks takes"):
        fit_classifier(tmp_path / "data", tmp_path / "probe", weights=backbone_dir, landmarks=0)
    assert LandmarkPolicy.parse(str(LandmarkPolicy("budget", 7))) == LandmarkPolicy("budget", 7)  # metadata round trip
