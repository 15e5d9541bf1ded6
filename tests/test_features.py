"""soft features: library (formats, sinks, tiling plan) and command line, on a tiny SOFT model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file

from softcli.errors import OutputError, UsageError
from softcli.constants import IMAGENET_MEAN, IMAGENET_STD
from softcli.features import extract_features, plan_features
from softcli.stages import parse_stages

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _reference(model, img: np.ndarray) -> list[np.ndarray]:
    """forward_features on the image edge-padded to a multiple of 32, cropped to ceil(H/s)."""
    h, w = img.shape[:2]
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    x = F.pad(x, (0, -w % 32, 0, -h % 32), mode="replicate")
    with torch.inference_mode():
        maps = model.forward_features(x)
    return [m[0, :, : -(-h // s), : -(-w // s)].numpy() for m, s in zip(maps, (4, 8, 16, 32))]


def test_whole_image_matches_forward_features(tiny_model, tmp_path):
    img = _image(100, 150)
    res = extract_features(tiny_model, img, tmp_path / "f.safetensors", pool=True)
    assert res.plan.mode == "whole" and res.plan.tiles == 1 and res.plan.sink == "memory"
    got = load_file(tmp_path / "f.safetensors")
    ref = _reference(tiny_model, img)
    for i, r in enumerate(ref, 1):
        assert got[f"stage{i}"].shape == r.shape and got[f"stage{i}"].dtype == np.float32
        np.testing.assert_allclose(got[f"stage{i}"], r, atol=1e-4)
    np.testing.assert_allclose(got["pooled"], ref[3].mean(axis=(1, 2)), atol=1e-5)
    assert res.maps["stage1"] == [16, 25, 38] and res.to_json()["pooled_dim"] == 64
    # Early stages only: the model stops after stage 2, same numbers.
    extract_features(tiny_model, img, tmp_path / "early.npz", stages="1,2")
    early = np.load(tmp_path / "early.npz")
    assert sorted(early.keys()) == ["metadata", "stage1", "stage2"]  # metadata: softcli.io.provenance
    np.testing.assert_allclose(early["stage2"], ref[1], atol=1e-4)


def test_formats_agree_and_disk_sink_matches_memory(tiny_model, tmp_path):
    img = _image(160, 224, seed=1)
    kw = dict(stages="2,4", tile=96, overlap=32, context="tile")
    mem = extract_features(tiny_model, img, tmp_path / "m.npz", **kw)
    disk = extract_features(tiny_model, img, tmp_path / "d.safetensors", max_memory=64 * 1024, **kw)
    extract_features(tiny_model, img, tmp_path / "t.ome.tif", max_memory=64 * 1024, **kw)
    extract_features(tiny_model, img, tmp_path / "s4.npy", tile=96, overlap=32, stages="4", context="tile")
    assert mem.plan.sink == "memory" and disk.plan.sink == "disk" and mem.plan.mode == "tiled"
    assert mem.plan.tiles > 1
    npz = np.load(tmp_path / "m.npz")
    st = load_file(tmp_path / "d.safetensors")
    assert sorted(npz.keys()) == ["metadata", "stage2", "stage4"]
    assert sorted(st) == ["stage2", "stage4"]
    with tifffile.TiffFile(tmp_path / "t.ome.tif") as tf:
        assert tf.is_bigtiff and tf.is_ome and [s.name for s in tf.series] == ["stage2", "stage4"]
        tiff_maps = {s.name: s.asarray() for s in tf.series}
        assert tf.pages[0].is_tiled
    for name in ("stage2", "stage4"):
        np.testing.assert_array_equal(npz[name], st[name])
        np.testing.assert_array_equal(tiff_maps[name], st[name])
        assert np.isfinite(st[name]).all()
    np.testing.assert_array_equal(np.load(tmp_path / "s4.npy"), st["stage4"])
    assert st["stage2"].shape == (32, 20, 28)
    # Temporary map files are gone.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("out,kw,err", [
    ("f.npy", {}, "holds one array"),
    ("f.ome.tif", {"pool": True}, "pool needs"),
    ("f.png", {}, "unknown output format"),
    ("f.npz", {"stages": "1,5"}, "stages are numbers 1-4"),
    ("f.npz", {"overlap": 48}, "multiple of 32"),
    ("f.npz", {"tile": 100}, "multiple of 32"),
    ("f.npz", {"blend": "cubic"}, "^blend must be linear or gaussian"),
])
def test_usage_errors_before_compute(tiny_model, tmp_path, out, kw, err):
    with pytest.raises(UsageError, match=err):
        extract_features(tiny_model, _image(64, 64), tmp_path / out, **kw)
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_input(tiny_model, tmp_path):
    f = tmp_path / "img.tif"
    tifffile.imwrite(f, (_image(64, 64) * 255).astype(np.uint8), photometric="rgb")
    with pytest.raises(OutputError, match="input"):
        extract_features(tiny_model, f, f)


def test_parse_stages():
    assert parse_stages("4,1, 2") == (1, 2, 4) == parse_stages("4,4,2,1")
    assert parse_stages([3]) == (3,) and parse_stages(None, default=(2, 1)) == (1, 2)
    for bad in ("", "0", "5", "a", "1,,x", None):
        with pytest.raises(UsageError):
            parse_stages(bad)


def test_plan_uses_budget():
    channels, strides = [64, 128, 320, 512], [4, 8, 16, 32]
    _, small = plan_features(4096, 4096, channels, strides, max_memory=2**30)
    _, big = plan_features(4096, 4096, channels, strides, max_memory=2**33)
    _, whole = plan_features(800, 600, channels, strides)
    assert small.tile[0] < 1024 and small.sink == "disk"
    assert big.tile == (896, 896) and big.tiles == 25 and big.sink == "memory"
    assert whole.mode == "whole" and whole.tile == (800, 608)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import softcli
    from softcli.checkpoint import save_pretrained

    from .conftest import TINY_CONFIG

    torch.manual_seed(0)
    return save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=10), tmp_path_factory.mktemp("m") / "tiny")


def test_cli_pyramid_level_json(soft, tiny_ckpt, tmp_path):
    base = (_image(256, 192, seed=3) * 255).astype(np.uint8)
    f = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(f, bigtiff=True, ome=True) as tw:
        tw.write(base, subifds=1, tile=(64, 64), photometric="rgb")
        tw.write(base[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    out = tmp_path / "f.npz"
    r = soft("features", f, "--out", out, "--weights", tiny_ckpt, "--level", "1", "--stages", "3,4", "--pool",
             "--landmarks", "16", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["image_size"] == [128, 96] and doc["level"] == 1 and doc["landmarks"] == "budget:16"
    assert doc["maps"] == {"stage3": [48, 8, 6], "stage4": [64, 4, 3]} and doc["pooled_dim"] == 64
    z = np.load(out)
    assert z["stage3"].shape == (48, 8, 6) and z["pooled"].shape == (64,)


@pytest.mark.parametrize("args,code,msg", [
    (["--out", "{tmp}/f.npy"], 2, "holds one array"),
    (["--out", "{tmp}/f.npz", "--landmarks", "many"], 2, "--landmarks"),
    (["--out", "{tmp}/f.npz", "--level", "1"], 2, "only TIFF"),
    (["--out", "{tmp}/f.npz", "--max-memory", "lots"], 2, "--max-memory"),
])
def test_cli_errors(soft, tiny_ckpt, tmp_path, args, code, msg):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((_image(40, 40) * 255).astype(np.uint8)).save(img)
    r = soft("features", img, "--weights", tiny_ckpt, *[a.format(tmp=tmp_path) for a in args])
    err = r.stderr.decode()
    assert r.returncode == code and err.startswith("error:") and msg in err and "Traceback" not in err


def test_cli_needs_a_model_and_has_help(soft, tmp_path):
    r = soft("features", tmp_path / "x.png", "--out", tmp_path / "f.npz")
    assert r.returncode == 1 and "x.png: no such file" in r.stderr.decode()  # checked before any model loads
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    r = soft("features", tmp_path / "x.png", "--out", tmp_path / "f.npz", env={"HF_HUB_OFFLINE": "1",
                                                                              "HF_HOME": str(tmp_path / "hf")})
    err = r.stderr.decode()
    assert r.returncode == 1 and "--weights" in err and err.count("error:") == 1 and "Traceback" not in err
    h = soft("features", "--help")
    assert h.returncode == 0 and "Example: soft features" in h.stdout.decode()


@pytest.mark.parametrize("mode,kw", [("whole", {}), ("tile", {"context": "tile", "tile": 64, "overlap": 32}),
                                     ("global", {"context": "global", "tile": 64}),
                                     ("bands", {"context": "tile", "tile": 64, "overlap": 32})])
def test_pool_without_stage4_sums_it_without_storing_it(tiny_model, tmp_path, monkeypatch, mode, kw):
    """--pool with stages 1-3: the same pooled vector as with stage 4 kept (1e-6), yet no sink holds stage 4.

    ``bands``: a file image in tiles is resumable, its maps live in a PersistentSink (softcli.band_state)."""
    from softcli.engine import DiskSink, MemorySink, PersistentSink

    img = _image(150, 100, seed=3)
    image: object = img
    if mode == "bands":
        image = tmp_path / "img.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(image)
    ref = extract_features(tiny_model, image, tmp_path / "ref.npz", stages="2,4", pool=True, **kw)
    stored: list[str] = []
    for cls in (MemorySink, DiskSink, PersistentSink):
        monkeypatch.setattr(cls, "allocate", lambda self, name, shape, _orig=cls.allocate:
                            (stored.append(name), _orig(self, name, shape))[1])
    res = extract_features(tiny_model, image, tmp_path / "p.npz", stages="2", pool=True, **kw)
    assert stored == ["stage2"] and res.plan.context == ref.plan.context == mode.replace("bands", "tile")
    assert res.plan.map_bytes < ref.plan.map_bytes  # the plan counts no stage-4 map either
    got, want = np.load(tmp_path / "p.npz"), np.load(tmp_path / "ref.npz")
    assert sorted(got.keys()) == ["metadata", "pooled", "stage2"] and res.maps.keys() == {"stage2"}
    np.testing.assert_allclose(got["pooled"], want["pooled"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["pooled"], want["stage4"].mean(axis=(1, 2)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["stage2"], want["stage2"])
