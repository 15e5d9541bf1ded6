"""Global context (softcli.context): streamed over tiles, equal to one whole-image forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import softcli
from softcli.context import TensorSource, choose_context, run_global
from softcli.constants import IMAGENET_MEAN, IMAGENET_STD
from softcli.features import extract_features
from softcli.models import LandmarkPolicy
from tests.conftest import GOLDEN

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def _golden(name: str, landmarks: str):
    model = softcli.load_model(GOLDEN / f"{name}.weights.safetensors")
    model.set_landmark_policy(LandmarkPolicy.parse(landmarks))
    return model


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs plus noise: structure at every scale, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 64 + 2, w // 64 + 2, 3)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(0.8 * big + 0.2 * rng.random((h, w, 3), dtype=np.float32), 0, 1)


def _whole(model, img: np.ndarray, upto: int = 3) -> list[np.ndarray]:
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        return [m[0].numpy() for m in model.forward_features(x)[:upto]]


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * float(np.abs(ref).max()), err


def _check_features(model, img, tmp_path, **kw):
    res = extract_features(model, img, tmp_path / "g.safetensors", stages="1,2,3", context="global", **kw)
    assert res.plan.context == "global" and res.plan.mode == "global"
    got = load_file(tmp_path / "g.safetensors")
    for i, ref in enumerate(_whole(model, img), 1):
        _assert_close(got[f"stage{i}"], ref)
    return res


# The official landmark count at 1536x1152 is 48*36 = 1728 per head in every stage: 196 is below it.
# Slow (the longest default test); by default the budget below the official count is covered by
# test_global_equals_whole_forward_small[mini_norm-40] and test_global_exact_at_sizes_not_multiple_of_32
# (mini_plain auto and mini_norm 30 at 1000x770, 16 tiles of 256).
@pytest.mark.golden
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mini_plain", "mini_norm"])
def test_global_equals_whole_forward_1536x1152_budget_below_official(name, tmp_path):
    model = _golden(name, "auto")
    res = _check_features(model, _image(1536, 1152), tmp_path, tile=256)
    assert res.plan.tiles == 6 * 5  # 256-pixel tiles


@pytest.mark.golden
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mini_plain", "mini_norm"])
def test_global_equals_whole_forward_1536x1152_budget_above_official(name, tmp_path):
    _check_features(_golden(name, "2000"), _image(1536, 1152, seed=1), tmp_path, tile=256)


# Fast stand-in of the slow test above: 512x384 has 16*12 = 192 official landmarks, the budget is above.
@pytest.mark.golden
@pytest.mark.parametrize("name,landmarks", [("mini_plain", "1000"), ("mini_norm", "official"),
                                            ("mini_norm", "40")])
def test_global_equals_whole_forward_small(name, landmarks, tmp_path):
    _check_features(_golden(name, landmarks), _image(512, 384, seed=2), tmp_path, tile=128)


@pytest.mark.golden
@pytest.mark.parametrize("name,landmarks,size", [("mini_plain", "auto", (1000, 770)),
                                                 ("mini_norm", "30", (1000, 770)),
                                                 ("mini_norm", "official", (298, 230)),
                                                 ("mini_plain", "official", (298, 230))])
def test_global_exact_at_sizes_not_multiple_of_32(name, landmarks, size, tmp_path):
    """No padding at all: the streamed run equals forward_features of the unpadded image."""
    model = _golden(name, landmarks)
    img = _image(*size, seed=3)
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    refs = _whole(model, img)
    with run_global(model, TensorSource(x), upto=3, keep=(1, 2, 3), tile=256, spill_dir=tmp_path) as res:
        for i, ref in enumerate(refs, 1):
            h, w, _ = res.maps[i].shape
            _assert_close(res.maps[i].read(0, h, 0, w).transpose(2, 0, 1), ref)
    assert not list(tmp_path.iterdir())  # spilled activations removed


@pytest.mark.golden
def test_global_features_padded_like_whole_mode(tmp_path):
    """Through extract_features a non-multiple-of-32 image is edge-padded exactly as the whole mode pads it."""
    model = _golden("mini_plain", "auto")
    img = _image(330, 250, seed=4)
    whole = extract_features(model, img, tmp_path / "w.npz", stages="1,2,3,4", pool=True)
    glob = extract_features(model, img, tmp_path / "g.npz", stages="1,2,3,4", pool=True, context="global",
                            tile=128, max_memory=1)  # a tiny budget: activations spill to disk
    assert whole.plan.context == "whole" and glob.plan.activations == "disk"
    w, g = np.load(tmp_path / "w.npz"), np.load(tmp_path / "g.npz")
    for k in ("stage1", "stage2", "stage3", "stage4", "pooled"):
        _assert_close(g[k], w[k])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.golden
def test_global_stage4_class_token_is_whole_image(tmp_path):
    model = _golden("mini_norm", "auto")
    x = torch.randn(1, 3, 300, 420)
    with torch.inference_mode():
        ref = model(x)
    with run_global(model, TensorSource(x), upto=4, keep=(), tile=128) as res, torch.inference_mode():
        logits = model.forward_head(res.cls)
    _assert_close(logits.numpy(), ref.numpy())


@pytest.mark.golden
def test_interrupt_removes_spilled_activations(tmp_path):
    model = _golden("mini_plain", "auto")

    def stop(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_global(model, TensorSource(torch.randn(1, 3, 256, 256)), tile=64, spill_dir=tmp_path, on_step=stop)
    assert not list(tmp_path.iterdir())


def test_auto_chooses_whole_when_it_fits_else_global():
    cfg = softcli.models.SoftConfig.from_dict({"variant": "soft_tiny"})
    small = choose_context("auto", 512, 512, cfg, 13_000_000, 2 * 2**30)
    big = choose_context("auto", 16000, 16000, cfg, 13_000_000, 2 * 2**30)
    assert small.mode == "whole" and "fits" in small.reason
    assert big.mode == "global" and "over the memory limit" in big.reason
    assert choose_context("tile", 512, 512, cfg, 0, 2**30).mode == "tile"


@pytest.mark.golden
def test_cli_features_context_json(soft, tmp_path):
    from PIL import Image

    Image.fromarray((_image(192, 160) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    weights = GOLDEN / "mini_plain.weights.safetensors"
    r = soft("features", tmp_path / "x.png", "--out", tmp_path / "g.npz", "--weights", weights, "--stages", "1,3",
             "--context", "global", "--tile", "64", "--json")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["context"]["mode"] == "global" and doc["plan"]["mode"] == "global"
    r = soft("features", tmp_path / "x.png", "--out", tmp_path / "w.npz", "--weights", weights, "--stages", "1,3")
    assert r.returncode == 0, r.stderr.decode()
    assert "context whole: the whole image fits" in r.stderr.decode()
    g, w = np.load(tmp_path / "g.npz"), np.load(tmp_path / "w.npz")
    _assert_close(g["stage3"], w["stage3"])
    r = soft("features", tmp_path / "x.png", "--out", tmp_path / "e.npz", "--weights", weights, "--context", "band")
    assert r.returncode == 2 and r.stderr.decode().startswith("error:") and "--context" in r.stderr.decode()


# -- segment: the flat-colour scene of issue 11 ------------------------------------------------

def _flat_png(tmp_path, h: int, w: int):
    from PIL import Image

    from tests.synthetic import flat_scene

    img, gt = flat_scene(h, w)
    path = tmp_path / "regions.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
    return path, gt


@pytest.mark.golden
def test_cli_segment_default_recovers_flat_regions(soft, tmp_path):
    """Default settings (auto context) on the 1536² flat scene: the three regions come back.

    With tiled context (1024² tiles) the same command gave mean IoU 0.44 (bench/README.md).
    """
    from tests.synthetic import best_match_miou

    src, gt = _flat_png(tmp_path, 1536, 1536)
    r = soft("segment", src, "--out", tmp_path / "m.png", "--clusters", "3",
             "--weights", GOLDEN / "soft_tiny.weights.safetensors", "--json")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["context"]["mode"] in ("whole", "global")
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert best_match_miou(mask, gt, 3) >= 0.85


@pytest.mark.golden
def test_segment_global_context_matches_whole(tmp_path):
    """Forced global context with small tiles labels the flat scene as the whole-image pass does."""
    from softcli.segment import segment
    from tests.synthetic import best_match_miou

    src, gt = _flat_png(tmp_path, 768, 640)
    weights = GOLDEN / "soft_tiny.weights.safetensors"
    whole = segment(src, tmp_path / "w.npy", weights=weights, clusters=3, context="auto")
    glob = segment(src, tmp_path / "g.npy", weights=weights, clusters=3, context="global", tile=256,
                   max_memory=1)  # spill activations to disk
    assert whole["context"]["mode"] == "whole" and glob["context"]["mode"] == "global"
    w, g = np.load(tmp_path / "w.npy"), np.load(tmp_path / "g.npy")
    assert best_match_miou(g, w, 3) >= 0.99
    assert best_match_miou(g, gt, 3) >= 0.85
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_segment_global_needs_clusters(tmp_path):
    from softcli.errors import UsageError
    from softcli.segment import segment

    src, _ = _flat_png(tmp_path, 64, 64)
    with pytest.raises(UsageError, match="global context needs"):
        segment(src, tmp_path / "m.npy", weights=tmp_path / "nothing", context="global")


@pytest.mark.golden
@pytest.mark.slow
def test_segment_6000x4000_flat_scene_has_no_tile_artefacts(tmp_path):
    """The large version of the flat scene, forced to global context: no tile-shaped label blocks."""
    from softcli.segment import segment
    from tests.synthetic import best_match_miou

    src, gt = _flat_png(tmp_path, 4000, 6000)
    segment(src, tmp_path / "m.npy", weights=GOLDEN / "soft_tiny.weights.safetensors", clusters=3,
            context="global", max_pixels=None)
    assert best_match_miou(np.load(tmp_path / "m.npy"), gt, 3) >= 0.9


# -- classify --full-res ------------------------------------------------------------------------

@pytest.mark.golden
def test_classify_full_res_global_equals_one_pass(soft, tmp_path):
    from PIL import Image

    from softcli.classify import classify_paths

    Image.fromarray((_image(330, 450, seed=5) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    model = _golden("mini_norm", "auto")
    one = next(classify_paths(model, [tmp_path / "x.png"], full_res=True, top_k=10))
    glob = next(classify_paths(model, [tmp_path / "x.png"], full_res=True, top_k=10, context="global"))
    assert one.context.startswith("whole") and glob.context.startswith("global")
    assert [p.index for p in one.predictions] == [p.index for p in glob.predictions]
    np.testing.assert_allclose([p.prob for p in glob.predictions], [p.prob for p in one.predictions], atol=1e-5)
    r = soft("classify", tmp_path / "x.png", "--weights", GOLDEN / "mini_norm.weights.safetensors", "--full-res",
             "--context", "global", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)[0]["context"].startswith("global")
    r = soft("classify", tmp_path / "x.png", "--weights", GOLDEN / "mini_norm.weights.safetensors", "--full-res",
             "--context", "tile")
    assert r.returncode == 2 and r.stderr.decode().startswith("error:") and "no tiled mode" in r.stderr.decode()


# -- tile mode and the deepest stage ----------------------------------------------------------

class _Planned(Exception):
    pass


def _plan_of(model, img, tmp_path, **kw):
    plans = []

    def stop(plan):
        plans.append(plan)
        raise _Planned

    with pytest.raises(_Planned):
        extract_features(model, img, tmp_path / "f.npz", on_plan=stop, **kw)
    return plans[0]


def test_tile_mode_uses_the_largest_tile_that_fits(tiny_model, tmp_path):
    img = np.zeros((2400, 2400, 3), np.float32)
    roomy = _plan_of(tiny_model, img, tmp_path, context="tile", max_memory=16 * 2**30)
    tight = _plan_of(tiny_model, img, tmp_path, context="tile", max_memory=int(0.7 * 2**30))
    assert roomy.context == "tile" and roomy.tiles == 1  # no fixed 1024 cap
    assert tight.tiles > 1 and tight.tile[0] > 1024


def test_stages_past_the_deepest_needed_never_run(tiny_model, tmp_path):
    from softcli.cluster import StageEmbedder

    def boom(*args):
        raise AssertionError("a stage that was not needed ran")

    for i in (2, 3):
        tiny_model.stages[i].register_forward_pre_hook(boom)
        tiny_model.stages[i].patch_embed.register_forward_pre_hook(boom)
    with torch.inference_mode():
        StageEmbedder(tiny_model, (1, 2))(torch.randn(1, 3, 128, 128))
    with run_global(tiny_model, TensorSource(torch.randn(1, 3, 128, 96)), upto=2, keep=(1, 2), tile=64) as res:
        assert sorted(res.maps) == [1, 2]
    extract_features(tiny_model, np.zeros((96, 64, 3), np.float32), tmp_path / "s12.npz", stages="1,2",
                     context="tile", tile=64, overlap=32)


def test_tissue_masking_takes_tiles_instead_of_global_context():
    """Global context computes every token, so with tissue masking ``auto`` falls back to tiles
    and an explicit ``global`` is a usage error; whole passes and tiles are left as chosen."""
    from softcli.context import ContextChoice, tissue_context
    from softcli.errors import UsageError

    auto_global = ContextChoice("global", "one pass would need about 9.0 GB, over the memory limit", 9 * 2**30)
    assert tissue_context(auto_global, masking=False) is auto_global
    fallback = tissue_context(auto_global, masking=True)
    assert fallback.mode == "tile" and "tissue" in fallback.reason
    whole = ContextChoice("whole", "fits", 2**30)
    assert tissue_context(whole, masking=True) is whole
    with pytest.raises(UsageError, match="tissue"):
        tissue_context(ContextChoice("global", "asked for: exact whole-image context", 2**30), masking=True)
