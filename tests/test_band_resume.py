"""Issue 13, inside one image: resume from the last finished band of tile rows, and ``--split tiles`` on torchrun."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F

from softcli.band_state import BandState, state_folder
from softcli.engine import MemorySink, OutputSpec, run_dense
from softcli.io.atomic import remove_stale_temporaries
from softcli.io.readers import ArrayReader
from softcli.tiling import TileGrid

from .conftest import run_soft
from .killing import clean_then_killed, one_thread_env
from .synthetic import ONE_THREAD_ENV
from .zygote import torchrun


@pytest.fixture(scope="module")
def weights(tiny_backbone: Path) -> Path:
    return tiny_backbone


def blocky_tiff(path: Path, side: int, seed: int = 0) -> Path:
    """A tiled, deflated RGB TIFF of 32-pixel random blocks (small on disk, read region by region)."""
    import tifffile

    rng = np.random.default_rng(seed)
    small = (rng.random((side // 32, side // 32, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(path, np.repeat(np.repeat(small, 32, 0), 32, 1), tile=(512, 512), compression="zlib")
    return path


# -- the engine: any subset of tile rows, run in pieces, gives the same maps ------------------------

@pytest.mark.parametrize("tile,overlap", [(64, 32), (64, 48), (96, 32)])
def test_rows_in_pieces_equal_one_pass(tile, overlap):
    """Warm-up rows make every piece blend exactly as the whole run (overlap 48 of 64: 3 earlier rows reach in)."""
    rng = np.random.default_rng(1)
    img = rng.random((300, 170, 3)).astype(np.float32)
    grid = TileGrid(300, 170, tile=tile, overlap=overlap)

    def fn(x):
        return [F.avg_pool2d(x, 4) * 2 - 1, F.avg_pool2d(x.mean(1, keepdim=True), 8)]

    args = {"outputs": [OutputSpec("a", 3, 4), OutputSpec("b", 1, 8)]}
    whole = MemorySink()
    stitcher = run_dense(fn, ArrayReader(img), grid, sink=whole, **args)
    pieces, bands = MemorySink(), {}
    cuts = [0, 1, 2, grid.rows // 2, grid.rows]
    for r0, r1 in reversed(list(itertools.pairwise(cuts))):  # any order: each piece warms up on its own
        run_dense(fn, ArrayReader(img), grid, sink=pieces, rows=range(r0, r1),
                  on_band=lambda row, sums: bands.setdefault(row, [s.copy() for s in sums]), **args)
    for name in ("a", "b"):
        assert np.array_equal(whole.array(name), pieces.array(name)), name
    assert sorted(bands) == list(range(grid.rows))
    total = np.zeros(3, np.float64)
    for r in range(grid.rows):
        total += bands[r][0]
    assert np.array_equal(total, stitcher.sums[0])


def test_state_kept_by_the_sweep_and_replaced_when_settings_change(tmp_path):
    out = tmp_path / "mask.png"
    state = BandState(out, {"tile": 1024}, rows=4)
    state.prepare()
    with state.sink() as sink:
        sink.allocate("scores", (2, 8, 8))
        sink.write_rows("scores", 0, np.ones((2, 8, 8), np.float32))
        state.mark_done(sink, 0, [np.zeros(2)])
    assert state_folder(out) == tmp_path / "mask.png.partial-state"
    assert remove_stale_temporaries(tmp_path) == [] and state.folder.is_dir()  # no PID in the name: never swept
    again = BandState(out, {"tile": 1024}, rows=4)
    again.prepare()
    assert again.resumed_rows == 1 and again.todo(range(4)) == [1, 2, 3]
    with again.sink() as sink:
        sink.allocate("scores", (2, 8, 8))
        assert np.array_equal(sink.array("scores"), np.ones((2, 8, 8), np.float32))
    other = BandState(out, {"tile": 512}, rows=4)
    other.prepare()
    assert other.resumed_rows == 0 and not (state.folder / "scores.f32").exists()


# -- the command line: SIGKILL after some bands, rerun, same output as a clean run -----------------

def _segment_killed_then_resumed(weights: Path, tmp_path: Path, side: int, tile: int, kill_after: int) -> None:
    """SIGKILL ``soft segment`` after ``kill_after`` bands, rerun: the mask equals a --no-resume run, byte for byte."""
    image = blocky_tiff(tmp_path / "big.tif", side)
    common = ["segment", str(image), "--weights", str(weights), "--clusters", "3", "--device", "cpu",
              "--tile", str(tile), "--overlap", "64", "--context", "tile", "--json"]
    (tmp_path / "clean").mkdir()
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "mask.png"
    state = state_folder(out)
    rows = -(-side // (tile - 64))
    _, done = clean_then_killed(common, tmp_path / "clean" / "mask.png", out, kill_after, tmp_path)
    assert not out.exists() and (state / "state.json").is_file()
    assert kill_after <= done < rows, "the kill came after the last band"
    resumed = run_soft(*common, "--out", out, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert json.loads(resumed.stdout)["resumed_rows"] >= done
    for name in ("mask.png", "mask.legend.json"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mask.legend.json", "mask.png"]  # state removed


def test_segment_killed_then_resumed_equals_clean_run(weights, tmp_path):
    _segment_killed_then_resumed(weights, tmp_path, side=2048, tile=256, kill_after=2)


@pytest.mark.slow
def test_segment_8192_killed_then_resumed_equals_clean_run(weights, tmp_path):
    _segment_killed_then_resumed(weights, tmp_path, side=8192, tile=1024, kill_after=3)


def test_features_killed_then_resumed_equals_clean_run(weights, tmp_path):
    image = blocky_tiff(tmp_path / "big.tif", 2048, seed=2)
    common = ["features", str(image), "--weights", str(weights), "--device", "cpu", "--stages", "3,4", "--pool",
              "--tile", "256", "--overlap", "64", "--context", "tile", "--json"]
    out = tmp_path / "f.safetensors"
    _, done = clean_then_killed(common, tmp_path / "clean.safetensors", out, 2, tmp_path)
    assert done < 11 and not out.exists()
    resumed = run_soft(*common, "--out", out, env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert json.loads(resumed.stdout)["resumed_rows"] >= done
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "clean.safetensors"), load_file(out)
    assert sorted(a) == sorted(b) == ["pooled", "stage3", "stage4"]
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    assert not state_folder(out).exists()


def test_changed_settings_start_afresh(weights, tmp_path):
    """A state left by a run with other settings (here another --seed) is not reused."""
    image = blocky_tiff(tmp_path / "img.tif", 1024, seed=4)
    common = ["segment", str(image), "--weights", str(weights), "--clusters", "2", "--device", "cpu",
              "--tile", "256", "--context", "tile", "--json"]
    out = tmp_path / "m.png"
    folder = state_folder(out)
    (folder / "done").mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"version": 1, "settings": "0" * 64, "rows": 5}))
    (folder / "done" / "00000.json").write_text(json.dumps({"sums": [[0.0, 0.0]]}))
    r = run_soft(*common, "--out", out, env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["resumed_rows"] == 0 and not folder.exists()
    plain = run_soft(*common, "--out", tmp_path / "plain.png", "--no-resume", env=ONE_THREAD_ENV)
    assert plain.returncode == 0 and out.read_bytes() == (tmp_path / "plain.png").read_bytes()


# -- --split tiles under torchrun ---------------------------------------------------------------

def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """The real torchrun launcher; its two ranks fork from the warm zygote (tests/zygote.py)."""
    return torchrun(2, list(args), one_thread_env())


def split_and_single_runs(seg: list[str], feats: list[str], tmp_path: Path,
                          single: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``soft segment`` (``seg``) and ``soft features`` (``feats``) as one process (plus ``single``) and
    under 2-rank torchrun with ``--split tiles``; check both succeed, leave no state and give the same mask
    bytes; return the feature maps (one process, two ranks) for the caller's comparison."""
    from safetensors.numpy import load_file

    for args, name in ((seg, "mask.png"), (feats, "f.safetensors")):
        one = run_soft(*args, "--out", tmp_path / f"one-{name}", *single, env=ONE_THREAD_ENV)
        assert one.returncode == 0, one.stderr.decode()
        two = _torchrun(*args, "--out", str(tmp_path / f"two-{name}"), "--split", "tiles")
        assert two.returncode == 0, two.stderr.decode()
        assert not state_folder(tmp_path / f"two-{name}").exists()
    assert (tmp_path / "two-mask.png").read_bytes() == (tmp_path / "one-mask.png").read_bytes()
    return load_file(tmp_path / "one-f.safetensors"), load_file(tmp_path / "two-f.safetensors")


@pytest.mark.parametrize("side,tile", [(1024, 256), pytest.param(4096, 512, marks=pytest.mark.slow)])
def test_split_tiles_two_ranks_equal_one_process(weights, tmp_path, side, tile):
    """``torchrun --nproc-per-node 2 -m softcli segment|features IMG --out F --split tiles`` on gloo.

    1024² in 4x4 tiles of 256 by default, the 4096² of issue 13 (64 tiles of 512) with
    ``-m slow``: the same code path, the same split of tile rows across the two ranks.
    """
    image = blocky_tiff(tmp_path / "big.tif", side, seed=5)
    seg = ["segment", str(image), "--weights", str(weights), "--clusters", "3", "--device", "cpu",
           "--tile", str(tile), "--overlap", "64", "--context", "tile"]
    feats = ["features", str(image), "--weights", str(weights), "--device", "cpu", "--stages", "4", "--pool",
             "--tile", str(tile), "--overlap", "64", "--context", "tile"]
    a, b = split_and_single_runs(seg, feats, tmp_path)
    for key in ("stage4", "pooled"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)


def test_split_tiles_needs_one_output():
    r = run_soft("segment", "a.png", "b.png", "--out-dir", "x", "--clusters", "2", "--split", "tiles")
    assert r.returncode == 2 and "--split tiles splits one image" in r.stderr.decode()
    r = run_soft("segment", "a.png", "--out", "m.png", "--clusters", "2", "--split", "rows")
    assert r.returncode == 2 and "--split takes inputs or tiles" in r.stderr.decode()
