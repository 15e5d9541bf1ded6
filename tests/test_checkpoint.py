"""Checkpoint formats: official .pth as the training script saves it, safetensors, softcli folders,
and clear refusals for unsafe, truncated, corrupt or mismatched files."""

from __future__ import annotations

import argparse
import json
import pickle
import struct
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

import softcli
from softcli.checkpoint import read_checkpoint, save_pretrained
from softcli.errors import CheckpointError
from softcli.models import SoftConfig, infer_config
from tests.conftest import TINY_CONFIG


def _official_state(golden, name="mini_plain"):
    return load_file(str(golden / f"{name}.weights.safetensors"))


def _reference(golden, name="mini_plain", case="b1_256x192"):
    return load_file(str(golden / f"{name}.{case}.safetensors"))


def _logits(model, x):
    with torch.inference_mode():
        return model(x)


def test_official_training_checkpoint_loads(golden, tmp_path):
    """torch.save of {state_dict with module. prefixes, state_dict_ema, args Namespace, epoch}."""
    sd = _official_state(golden, "mini_norm")
    wrapped = OrderedDict(("module." + k, v) for k, v in sd.items())
    ema = OrderedDict(("module." + k, v * 0) for k, v in sd.items())
    args = argparse.Namespace(model="mini", lr=5e-4, input_size=224, drop_path=0.1, opt="adamw",
                              sched="cosine", mixup=0.8, aa="rand-m9-mstd0.5-inc1", data_path="/x")
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 299, "arch": "soft_norm", "state_dict": wrapped, "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "args": args, "metric": 79.4}, path)
    ck = read_checkpoint(path)
    assert ck.format == "official-pth"
    # No config inside a .pth: the architecture is inferred from keys and shapes (norm cannot be).
    assert ck.config.embed_dims == (32, 64, 80, 128) and ck.config.depths == (1, 2, 2, 1)
    assert ck.config.num_heads[:3] == (2, 4, 5) and ck.config.num_classes == 10
    ref = _reference(golden, "mini_norm", "b1_224")
    from softcli.checkpoint import build_model

    ck.config = SoftConfig.from_dict(json.loads((golden / "manifest.json").read_text())["mini_norm"]["config"])
    model = build_model(ck)
    scale = ref["logits"].abs().max()
    assert (_logits(model, ref["input"]) - ref["logits"]).abs().max() <= 1e-4 * scale
    # The EMA weights are chosen on request.
    assert torch.count_nonzero(read_checkpoint(path, use_ema=True).state_dict["head.weight"]) == 0


def test_args_model_name_selects_the_variant(golden, tmp_path):
    """A .pth carries no config, but its args Namespace names the variant (norm is not in the shapes)."""
    model = softcli.create_model("soft_norm_tiny")
    official = {}
    # Build an official-layout dict by sending the official key list through the filter.
    keys = json.loads((golden / "official_state_dict_keys.json").read_text())
    from softcli.models import checkpoint_filter_fn

    ours = model.state_dict()
    for off in keys["soft_norm_tiny"]["state_dict"]:
        (new,) = checkpoint_filter_fn({off: torch.empty(0)})
        official[off] = ours[new]
    path = tmp_path / "soft_norm_tiny.pth"
    torch.save({"model": official, "args": argparse.Namespace(model="soft_norm_tiny")}, path)
    loaded = softcli.load_model(path)
    assert loaded.config.variant == "soft_norm_tiny" and loaded.config.norm
    x = torch.randn(1, 3, 96, 96)
    assert torch.allclose(_logits(loaded, x), _logits(model, x), atol=1e-6)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/softcli-pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": _Evil()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        softcli.load_model(path)
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, zipped)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        softcli.load_model(zipped)


def test_official_safetensors_without_metadata_infers_architecture(golden, tmp_path):
    sd = _official_state(golden, "mini_plain")
    path = tmp_path / "nometa.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    cfg = read_checkpoint(path).config
    assert cfg.embed_dims == (32, 64, 80, 128)
    assert cfg.num_heads == (2, 4, 5, 4)  # stage-4 heads default to C4/32 without a config
    cfg_meta = read_checkpoint(golden / "mini_plain.weights.safetensors").config
    assert cfg_meta.num_heads == (2, 4, 5, 8)  # the metadata config wins


def test_save_pretrained_round_trip(tiny_model, tmp_path):
    labels = [f"class {i}" for i in range(10)]
    out = save_pretrained(tiny_model, tmp_path / "repo", labels=labels,
                          pretrained_cfg={"input_size": [3, 64, 64], "interpolation": "bilinear"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["embed_dims"] == TINY_CONFIG["embed_dims"]
    loaded = softcli.load_model(out)
    assert loaded.labels == labels and loaded.pretrained_cfg["input_size"] == [3, 64, 64]
    assert loaded.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    x = torch.randn(2, 3, 64, 80)
    assert torch.equal(_logits(loaded, x), _logits(tiny_model.eval(), x))
    # The weights file alone carries its config in metadata.
    alone = softcli.load_model(out / "model.safetensors")
    assert alone.config == tiny_model.config


def test_wrong_architecture_is_one_clear_error(golden, tmp_path):
    ck = read_checkpoint(golden / "mini_plain.weights.safetensors")
    ck.config = SoftConfig.from_dict({**TINY_CONFIG})
    from softcli.checkpoint import build_model

    with pytest.raises(CheckpointError, match=r"does not fit .*has shape"):
        build_model(ck)
    # A metadata config that contradicts the tensors.
    sd = _official_state(golden, "mini_plain")
    path = tmp_path / "liar.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"config": '{"variant": "soft_tiny"}'})
    with pytest.raises(CheckpointError, match="does not fit soft_tiny"):
        softcli.load_model(path)
    # Not a SOFT network at all.
    other = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, str(other))
    with pytest.raises(CheckpointError, match="not a SOFT checkpoint"):
        softcli.load_model(other)


def test_truncated_and_corrupt_files(golden, tmp_path):
    data = (golden / "mini_plain.weights.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        softcli.load_model(truncated)
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + data[100:200])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        softcli.load_model(bad_header)
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        softcli.load_model(huge_header)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        softcli.load_model(empty)
    pth = tmp_path / "good.pth"
    torch.save({"state_dict": _official_state(golden)}, pth)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        softcli.load_model(cut)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hello, I am not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        softcli.load_model(garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        softcli.load_model(tmp_path / "missing.pth")


def test_nan_weights_are_refused(golden, tmp_path):
    sd = dict(_official_state(golden))
    sd["head.weight"] = sd["head.weight"].clone()
    sd["head.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    cfg = json.dumps(json.loads((golden / "manifest.json").read_text())["mini_plain"]["config"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"config": cfg})
    with pytest.raises(CheckpointError, match="NaN"):
        softcli.load_model(path)


def test_infer_config_from_our_layout(tiny_model):
    cfg = infer_config(tiny_model.state_dict())
    assert cfg.embed_dims == tuple(TINY_CONFIG["embed_dims"]) and cfg.depths == (1, 1, 1, 1)
    assert cfg.num_heads[:3] == tuple(TINY_CONFIG["num_heads"][:3])
