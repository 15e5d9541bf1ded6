"""Issue 13 in global context: resume at the last finished layer pass, and ``--split tiles`` across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from softcli.band_state import BandState, state_folder
from softcli.context import LayerCheckpoints, TensorSource, count_passes, run_global
from softcli.errors import OutputError

from .conftest import run_soft
from .killing import clean_then_killed, kill_after_recorded
from .synthetic import ONE_THREAD_ENV
from .test_band_resume import blocky_tiff, split_and_single_runs


@pytest.fixture(scope="module")
def weights(tiny_backbone: Path) -> Path:
    return tiny_backbone


def _maps(res, stages) -> dict[int, np.ndarray]:
    return {s: res.maps[s].read(0, res.maps[s].shape[0], 0, res.maps[s].shape[1]).copy() for s in stages}


@pytest.mark.parametrize("stop_at", [20, 30, 80, 120])  # of 121 steps: 12 tiles a pass
def test_interrupted_run_resumes_at_its_last_pass(tiny_model, tmp_path, stop_at):
    """Stopped at any tile of any pass, a rerun skips the finished passes and gives the same maps and class token."""
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    with run_global(tiny_model, TensorSource(x), upto=4, keep=(1, 3, 4), tile=64) as res:
        ref, ref_cls = _maps(res, (1, 3, 4)), res.cls.clone()
    passes = count_passes(tiny_model, 4)
    assert passes == 3 * 3 + 2  # per stage: embedding, pass A, pass B; stage 4: embedding, softmax blocks

    def state() -> LayerCheckpoints:
        band = BandState(tmp_path / "f.safetensors", {"test": 1}, passes)
        band.prepare()
        return LayerCheckpoints(band)

    def stop(done: int, total: int) -> None:
        if done == stop_at:
            raise KeyboardInterrupt

    first = state()
    with pytest.raises(KeyboardInterrupt):
        run_global(tiny_model, TensorSource(x), upto=4, keep=(1, 3, 4), tile=64, checkpoints=first, on_step=stop)
    finished = set(first.state.finished())
    assert finished == set(range(len(finished)))  # passes finish in order
    assert 0 < len(finished) < passes
    kept = {p.name for p in first.folder.glob("pass*.f32")}
    assert len(kept) <= 4  # the current input, a partial output, kept stage maps: not every layer's
    again = state()
    assert again.resumed == len(finished)
    steps: list[int] = []
    with run_global(tiny_model, TensorSource(x), upto=4, keep=(1, 3, 4), tile=64, checkpoints=again,
                    on_step=lambda done, total: steps.append(done)) as res:
        got, cls = _maps(res, (1, 3, 4)), res.cls
    assert steps[-1] == 121 and steps[0] > 1  # progress counts the skipped passes' tiles as done
    for s in ref:
        assert np.array_equal(got[s], ref[s]), s
    assert torch.equal(cls, ref_cls)
    assert again.resumed == len(finished) and len(again.state.finished()) == passes
    assert again.folder.is_dir()  # kept until the caller's output is complete
    again.state.remove()


def test_missing_map_of_a_finished_pass_is_an_error_not_zeros(tiny_model, tmp_path):
    x = torch.randn(1, 3, 128, 128)
    band = BandState(tmp_path / "m.png", {"test": 2}, count_passes(tiny_model, 2))
    band.prepare()
    with run_global(tiny_model, TensorSource(x), upto=2, keep=(2,), tile=64, checkpoints=LayerCheckpoints(band)):
        pass
    for p in band.folder.glob("pass*.f32"):
        p.unlink()
    with run_global(tiny_model, TensorSource(x), upto=2, keep=(2,), tile=64,
                    checkpoints=LayerCheckpoints(band)) as res, pytest.raises(OutputError, match="resumable activation"):
        res.maps[2].read(0, 1, 0, 1)


# -- the command line: SIGKILL after some passes, rerun, same output as an uninterrupted run ---------------

def test_segment_global_killed_then_resumed_equals_clean_run(weights, tmp_path):
    image = blocky_tiff(tmp_path / "img.tif", 1024, seed=6)
    common = ["segment", str(image), "--weights", str(weights), "--clusters", "3", "--device", "cpu",
              "--tile", "128", "--context", "global", "--json"]
    (tmp_path / "clean").mkdir()
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "mask.png"
    clean, done = clean_then_killed(common, tmp_path / "clean" / "mask.png", out, 4, tmp_path)
    assert json.loads(clean.stdout)["context"]["mode"] == "global"
    resumed = run_soft(*common, "--out", out, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert json.loads(resumed.stdout)["resumed_passes"] == done
    for name in ("mask.png", "mask.legend.json"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mask.legend.json", "mask.png"]


def test_features_global_killed_then_resumed_equals_clean_run(weights, tmp_path):
    image = blocky_tiff(tmp_path / "img.tif", 1024, seed=7)
    common = ["features", str(image), "--weights", str(weights), "--device", "cpu", "--stages", "2,4", "--pool",
              "--tile", "128", "--context", "global", "--json"]
    out = tmp_path / "f.safetensors"
    _, done = clean_then_killed(common, tmp_path / "clean.safetensors", out, 5, tmp_path)
    assert done < 11 and not out.exists()
    resumed = run_soft(*common, "--out", out, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert json.loads(resumed.stdout)["resumed_passes"] == done
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "clean.safetensors"), load_file(out)
    assert sorted(a) == sorted(b) == ["pooled", "stage2", "stage4"]
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    assert not state_folder(out).exists()


@pytest.mark.slow
def test_split_tiles_global_two_ranks_equal_one_process(weights, tmp_path):
    """``torchrun --nproc-per-node 2 -m softcli segment|features IMG --context global --split tiles`` on gloo."""
    image = blocky_tiff(tmp_path / "img.tif", 1024, seed=8)
    seg = ["segment", str(image), "--weights", str(weights), "--clusters", "3", "--device", "cpu",
           "--tile", "256", "--context", "global"]
    feats = ["features", str(image), "--weights", str(weights), "--device", "cpu", "--stages", "1,4", "--pool",
             "--tile", "256", "--context", "global"]
    a, b = split_and_single_runs(seg, feats, tmp_path, single=("--no-resume",))
    for key in ("stage1", "stage4", "pooled"):
        np.testing.assert_array_equal(b[key], a[key])


def test_cohort_resumes_the_image_in_progress_at_its_last_pass(weights, tmp_path):
    """A killed ``--out-dir`` run: the rerun skips the finished image and resumes the other at its last pass."""
    from softcli.cohort.manifest import read_lines

    src = tmp_path / "in"
    src.mkdir()
    blocky_tiff(src / "a.tif", 768, seed=9)
    blocky_tiff(src / "b.tif", 512, seed=10)
    common = ["segment", str(src), "--weights", str(weights), "--clusters", "3", "--device", "cpu", "--tile", "128",
              "--context", "global", "--out-format", "png"]
    clean = run_soft(*common, "--out-dir", tmp_path / "clean", env=ONE_THREAD_ENV)
    assert clean.returncode == 0, clean.stderr.decode()
    out = tmp_path / "run"
    # Largest first: a.tif runs, then b.tif; kill b.tif's run after 4 of its passes.
    done = kill_after_recorded([*common, "--out-dir", str(out)], state_folder(out / "b.png"), 4, tmp_path)
    assert (out / "a.png").is_file() and not (out / "b.png").exists()
    again = run_soft(*common, "--out-dir", out, env=ONE_THREAD_ENV)
    assert again.returncode == 0, again.stderr.decode()
    records = {Path(r["input"]).name: r for r in read_lines(out / "manifest.jsonl")}
    assert records["a.tif"]["status"] == "skipped" and records["b.tif"]["status"] == "done"
    assert records["b.tif"]["resumed"] == done
    for name in ("a.png", "b.png", "b.legend.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert not state_folder(out / "b.png").exists()
