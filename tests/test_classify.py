"""The classify library: results in input order, per-input errors, labels, batching that changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from softcli.classify import classify
from softcli.io.image import load_image
from softcli.labels import imagenet_classes, labels_for
from softcli.preprocess import Preprocess, eval_transform

LABELS = [f"thing {i}" for i in range(10)]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (50, 80), (40, 40)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_results_in_order_with_errors_in_place(tiny_model, images, tmp_path):
    tiny_model.labels = LABELS
    (tmp_path / "empty.png").write_bytes(b"")
    inputs = [images[0], tmp_path / "missing.jpg", images[1], tmp_path / "empty.png", images[2]]
    results = classify(tiny_model, inputs, top_k=3, batch_size=4)
    assert [r.image for r in results] == [str(p) for p in inputs]
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert results[1].error == "no such file" and results[3].error == "empty file"
    for r in (results[0], results[2], results[4]):
        assert [p.rank for p in r.predictions] == [1, 2, 3]
        probs = [p.prob for p in r.predictions]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(p.label == LABELS[p.index] for p in r.predictions)
        assert r.input_size == (224, 224) and r.seconds > 0


def test_probabilities_are_the_softmax_of_the_logits(tiny_model, images):
    r = classify(tiny_model, [images[1]], top_k=10)[0]
    x = eval_transform(load_image(images[1]), Preprocess.for_model(tiny_model))
    with torch.no_grad():
        probs = torch.softmax(tiny_model(x[None]), dim=-1)[0]
    assert math.isclose(sum(p.prob for p in r.predictions), 1.0, rel_tol=1e-5)  # k = all classes
    for p in r.predictions:
        assert p.prob == pytest.approx(probs[p.index].item(), abs=1e-6)


def test_batching_does_not_change_predictions(tiny_model, images):
    one = classify(tiny_model, images * 2, top_k=10, batch_size=1)
    many = classify(tiny_model, images * 2, top_k=10, batch_size=8)
    assert len(one) == 3  # the same file twice is classified once
    for a, b in zip(one, many):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        assert [p.prob for p in a.predictions] == pytest.approx([p.prob for p in b.predictions], abs=1e-5)


def test_full_res_sees_the_whole_image(tiny_model, images):
    results = classify(tiny_model, images, full_res=True, top_k=20)
    assert [r.input_size for r in results] == [(48, 64), (80, 50), (40, 40)]
    assert all(len(r.predictions) == 10 for r in results)  # top_k is capped at the class count


def test_max_pixels_guard(tiny_model, images):
    r = classify(tiny_model, [images[0]], max_pixels=1000)[0]
    assert "decompression-bomb guard" in r.error


def test_imagenet_class_names_ship_with_the_package():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    assert names[207] == "golden retriever" and names[285] == "Egyptian cat"


def test_labels_for_model_labels_then_imagenet_then_numbers(tiny_model):
    import softcli

    assert labels_for(tiny_model)[:2] == ["class 0", "class 1"]
    tiny_model.labels = LABELS
    assert labels_for(tiny_model) == LABELS
    tiny_model.labels = LABELS[:4]  # too short: padded, never an IndexError
    assert labels_for(tiny_model)[3:5] == ["thing 3", "class 4"]
    from tests.conftest import TINY_CONFIG

    big = softcli.create_model(TINY_CONFIG, num_classes=1000)
    assert labels_for(big)[0] == "tench"


def test_models_that_cannot_classify_are_refused(tiny_model, images):
    import softcli
    from softcli.errors import CheckpointError
    from tests.conftest import TINY_CONFIG

    headless = softcli.create_model(TINY_CONFIG, num_classes=0)
    with pytest.raises(CheckpointError, match="no classification head"):
        classify(headless, images)
    tiny_model.pretrained_cfg = {"input_size": [3, 224, 224], "crop_pct": 7}
    with pytest.raises(CheckpointError, match="pretrained_cfg"):
        classify(tiny_model, images)
