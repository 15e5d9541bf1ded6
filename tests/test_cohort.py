"""Cohorts (issue 13): many inputs into --out-dir, manifest, resume after SIGKILL, failure policy, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softcli.cohort import Manifest, output_names, split_by_pixels
from softcli.cohort.inputs import gather_inputs, read_list_file
from softcli.cohort.manifest import append_line, part_path, read_lines

from .conftest import REPO, run_soft
from .synthetic import ONE_THREAD_ENV
from .zygote import soft_process, torchrun

SIZES = [(96, 128), (160, 96), (128, 128), (64, 200), (100, 100), (200, 64)]


@pytest.fixture(scope="module")
def weights(tiny_backbone: Path) -> Path:
    return tiny_backbone


def make_images(folder: Path, sizes=SIZES, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort-in") / "slides"
    make_images(folder)
    return folder


def seg_args(inputs, out_dir, weights, *extra):
    return ("segment", *map(str, inputs), "--weights", weights, "--clusters", "3", "--out-dir", out_dir,
            "--out-format", "png", "--device", "cpu", *extra)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name not in ("manifest.jsonl", ".soft-cohort.lock")}


def statuses(out_dir: Path) -> dict[str, str]:
    return {Path(r["input"]).name: r["status"] for r in read_lines(out_dir / "manifest.jsonl")}


@pytest.fixture(scope="module")
def clean_run(images, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort-clean") / "out"
    r = run_soft(*seg_args([images], out, weights), env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    return out


# -- pieces -------------------------------------------------------------------------------------

def test_output_names_collisions_are_hashed_and_order_independent():
    paths = ["a/slide.ome.tif", "b/Slide.png", "c/other.tif"]
    names = output_names(paths)
    assert names[2] == "other"
    assert names[0].startswith("slide-") and names[1].startswith("Slide-") and names[0][6:] != names[1][6:]
    assert output_names(paths[::-1]) == names[::-1]


def test_list_file_relative_to_its_folder_with_comments(tmp_path, images):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# cohort\n{images}/img0.png\n\n  {os.path.relpath(images / 'img1.png', tmp_path)}\nmissing.png\n")
    assert read_list_file(lst)[0] == f"{images}/img0.png"
    items = gather_inputs([str(images / "img0.png")], lst)  # img0 named twice: once
    assert [Path(i.path).name for i in items] == ["img0.png", "img1.png", "missing.png"]
    assert items[2].error == "no such file"


def test_split_by_pixels_largest_first_and_balanced():
    plan = split_by_pixels([10, 50, 40, 30, 20, 5], 2)
    assert plan == [[1, 4, 0], [2, 3, 5]]
    assert split_by_pixels([3, 1], 4) == [[0], [1], [], []]


def test_manifest_ignores_torn_lines_and_needs_intact_outputs(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"1234")
    part = part_path(tmp_path, 0)
    rec = {"input": "x.png", "status": "done", "settings_key": "k", "outputs": [{"path": str(out), "bytes": 4}]}
    append_line(part, rec)
    with open(part, "a") as fh:
        fh.write('{"input": "y.png", "sta')  # a writer killed mid-line
    m = Manifest(tmp_path)
    assert list(m.latest()) == [os.path.abspath("x.png")]
    assert m.reusable("x.png", "k", [str(out)]) is not None
    assert m.reusable("x.png", "other-settings", [str(out)]) is None
    assert m.reusable("x.png", "k", [str(tmp_path / "elsewhere.png")]) is None
    out.write_bytes(b"12")  # truncated since
    assert m.reusable("x.png", "k", [str(out)]) is None


# -- the command --------------------------------------------------------------------------------

def test_kill_after_two_outputs_then_resume_equals_clean_run(images, weights, clean_run, tmp_path):
    """SIGKILL once two inputs are recorded; the rerun skips those and the result equals a clean run."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), **ONE_THREAD_ENV}
    proc = soft_process(seg_args([images], out, weights), env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)  # forked from the warm zygote: a real process to kill
    part = part_path(out, 0)
    deadline = time.monotonic() + 120
    try:
        while sum(r["status"] == "done" for r in read_lines(part)) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {Path(r["input"]).name for r in read_lines(part) if r["status"] == "done"}
    assert 2 <= len(finished) < 6 and not (out / "manifest.jsonl").exists()

    r = run_soft(*seg_args([images], out, weights), env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    status = statuses(out)
    assert {n for n, s in status.items() if s == "skipped"} == finished
    assert {n for n, s in status.items() if s == "done"} == {f"img{i}.png" for i in range(6)} - finished
    assert files_of(out) == files_of(clean_run)  # byte for byte, and no temporary or part file left
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6


def test_rerun_skips_settings_change_and_overwrite_redo(images, weights, clean_run, tmp_path):
    out = tmp_path / "out"
    r = run_soft(*seg_args([images / "img0.png", images / "img1.png"], out, weights), env=ONE_THREAD_ENV)
    assert r.returncode == 0 and set(statuses(out).values()) == {"done"}
    r = run_soft(*seg_args([images / "img0.png", images / "img1.png"], out, weights, "--json"), env=ONE_THREAD_ENV)
    report = json.loads(r.stdout)  # clean JSON on stdout
    assert r.returncode == 0 and (report["skipped"], report["done"]) == (2, 0)
    r = run_soft(*seg_args([images / "img0.png"], out, weights, "--seed", "1"), env=ONE_THREAD_ENV)
    assert r.returncode == 0 and statuses(out) == {"img0.png": "done", "img1.png": "skipped"}
    r = run_soft(*seg_args([images / "img1.png"], out, weights, "--overwrite"), env=ONE_THREAD_ENV)
    assert r.returncode == 0 and statuses(out)["img1.png"] == "done"
    assert (out / "img1.png").read_bytes() == (clean_run / "img1.png").read_bytes()


def test_failures_are_recorded_and_max_failures_stops(images, weights, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.png", "b.png"):
        (bad / name).write_bytes(b"not an image")
    out = tmp_path / "out"
    r = run_soft(*seg_args([bad / "a.png", images / "img0.png", tmp_path / "missing.png"], out, weights),
                 env=ONE_THREAD_ENV)
    err = r.stderr.decode()
    assert r.returncode == 1
    assert f"error: {bad / 'a.png'}: not an image" in err and f"error: {tmp_path / 'missing.png'}: no such file" in err
    assert statuses(out) == {"a.png": "failed", "img0.png": "done", "missing.png": "failed"}
    assert "Traceback" not in err

    out2 = tmp_path / "out2"
    r = run_soft(*seg_args([bad, images / "img0.png"], out2, weights, "--max-failures", "1", "--json"),
                 env=ONE_THREAD_ENV)
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["stopped"] and report["failed"] == 1 and report["not_started"] == 2
    assert "--max-failures 1 reached" in r.stderr.decode()


def test_usage_errors(images, weights, tmp_path):
    r = run_soft("segment", images / "img0.png", images / "img1.png", "--clusters", "3", "--out", tmp_path / "m.png")
    assert r.returncode == 2 and r.stderr.decode().startswith("error: several inputs need --out-dir")
    r = run_soft(*seg_args([images], tmp_path / "o", weights, "--out", tmp_path / "m.png"))
    assert r.returncode == 2 and "--out names one file; with --out-dir" in r.stderr.decode()
    r = run_soft(*seg_args([images], tmp_path / "o", weights, "--out-format", "jpg"))
    assert r.returncode == 2 and "--out-format must be one of tif, png, npy" in r.stderr.decode()
    r = run_soft("segment", images / "img0.png", "--clusters", "3")
    assert r.returncode == 2 and "give --out FILE for one image, or --out-dir DIR" in r.stderr.decode()


def test_features_list_equals_single_runs(images, weights, tmp_path):
    from safetensors.numpy import load_file

    lst = tmp_path / "list.txt"
    lst.write_text(f"{images / 'img0.png'}\n{images / 'img3.png'}\n")
    out = tmp_path / "feats"
    r = run_soft("features", "--list", lst, "--out-dir", out, "--weights", weights, "--stages", "3,4",
                 "--device", "cpu", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    assert statuses(out) == {"img0.png": "done", "img3.png": "done"}
    single = tmp_path / "single.safetensors"
    r = run_soft("features", images / "img3.png", "--out", single, "--weights", weights, "--stages", "3,4",
                 "--device", "cpu", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    a, b = load_file(out / "img3.safetensors"), load_file(single)
    assert a.keys() == b.keys() == {"stage3", "stage4"}
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
    rec = read_lines(out / "manifest.jsonl")[1]
    assert rec["size"] == [64, 200] and rec["settings"]["stages"] == [3, 4] and len(rec["weights_sha256"]) == 64


def test_torchrun_two_ranks_equal_one_process(images, weights, clean_run, tmp_path):
    """``torchrun --standalone --nproc-per-node 2 -m softcli segment DIR --out-dir OUT`` on CPU (gloo).

    A broken input is recorded as failed and the ranks still finish: exit status 1, the rest identical.
    """
    out = tmp_path / "out"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    env = {**os.environ, "PYTHONPATH": str(REPO), **ONE_THREAD_ENV}
    env.pop("SOFTCLI_DEBUG", None)
    r = torchrun(2, seg_args([images, broken], out, weights), env, timeout=300)  # ranks fork from the zygote
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert files_of(out) == files_of(clean_run)
    records = read_lines(out / "manifest.jsonl")
    assert [Path(x["input"]).name for x in records] == [f"img{i}.png" for i in range(6)] + ["broken.png"]
    assert {x["rank"] for x in records[:6]} == {0, 1} and {x["status"] for x in records[:6]} == {"done"}
    assert records[6]["status"] == "failed" and f"error: {broken}: not an image" in err
    assert "[rank 1] 3 of 7 inputs to process here" in err and err.count("7 inputs: 6 done, 0 skipped, 1 failed") == 1


def test_one_image_under_torchrun_and_a_second_run_into_one_folder_are_refused(images, weights, tmp_path):
    r = run_soft("segment", images / "img0.png", "--clusters", "3", "--out", tmp_path / "m.png",
                 env={"WORLD_SIZE": "2", "RANK": "0"})
    assert r.returncode == 2 and "under torchrun give --out-dir DIR" in r.stderr.decode()
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".soft-cohort.lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        r = run_soft(*seg_args([images / "img0.png"], out, weights))
    assert r.returncode == 1 and "another soft run (pid 4242) is writing into this folder" in r.stderr.decode()
    assert not (out / "manifest.jsonl").exists()


def test_outputs_inside_an_input_folder_are_not_inputs(tmp_path):
    make_images(tmp_path / "slides", SIZES[:2])
    (tmp_path / "slides" / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "slides" / "masks" / "img0.png")
    names = [Path(i.path).relative_to(tmp_path).as_posix()
             for i in gather_inputs([tmp_path / "slides"], out_dir=tmp_path / "slides" / "masks")]
    assert names == ["slides/img0.png", "slides/img1.png"]


def test_python_api_with_extra_options(images, weights, tmp_path):
    """run_cohort + segment_task in process; ``extra`` keyword arguments reach segment() and the settings."""
    from softcli.cohort import run_cohort
    from softcli.cohort.tasks import segment_task

    items = gather_inputs([images / "img0.png", images / "img2.png"])
    task = segment_task(weights, model_name="tiny", out_format="npy", clusters=2, extra={"cluster_tiles": 1})
    report = run_cohort(items, tmp_path / "out", task)
    assert report.ok and report.count("done") == 2
    assert np.load(tmp_path / "out" / "img2.npy").shape == (128, 128)
    assert read_lines(tmp_path / "out" / "manifest.jsonl")[0]["settings"]["cluster_tiles"] == 1
    other = segment_task(weights, model_name="tiny", out_format="npy", clusters=2, extra={"cluster_tiles": 2})
    assert other.key != task.key and run_cohort(items, tmp_path / "out", task).count("skipped") == 2


def test_model_is_the_name_as_given_in_manifest_and_outputs(images, weights, tmp_path, monkeypatch):
    """``model`` is the spec as given (here ``~/tiny``) in every manifest line and output; the checkpoint it
    resolved to and its SHA-256 have their own fields, equal across segment and features."""
    from safetensors import safe_open

    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(weights, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    for args in (seg_args([images / "img0.png"], tmp_path / "seg", "~/tiny"),
                 ("features", images / "img0.png", "--out-dir", tmp_path / "feat", "--weights", "~/tiny",
                  "--stages", "4", "--device", "cpu")):
        r = run_soft(*args, env={**ONE_THREAD_ENV, "HOME": str(home)})
        assert r.returncode == 0, r.stderr.decode()
    seg, feat = (read_lines(tmp_path / d / "manifest.jsonl")[0] for d in ("seg", "feat"))
    assert seg["model"] == feat["model"] == "~/tiny"
    assert len(seg["weights_sha256"]) == 64 and seg["weights_sha256"] == feat["weights_sha256"]
    assert Path(seg["weights_path"]).resolve() == weights.resolve()  # the folder; features: its weights file
    assert Path(feat["weights_path"]).resolve() in (weights.resolve(), *weights.resolve().iterdir())
    legend = json.loads((tmp_path / "seg" / "img0.legend.json").read_text())
    with Image.open(tmp_path / "seg" / "img0.png") as png:
        text = dict(png.text)
    with safe_open(str(tmp_path / "feat" / "img0.safetensors"), "np") as f:
        meta = f.metadata()
    for made_by in (legend, text, meta):
        assert made_by["model"] == "~/tiny" and made_by["weights_sha256"] == seg["weights_sha256"]


def test_features_cohort_to_ome_zarr_resumes_by_folder(images, weights, tmp_path):
    """--out-format ome.zarr: folders renamed into place, a rerun skips both, a killed run's temporary
    folder is swept, a damaged folder (a chunk gone) is redone, and the maps equal a single-image run."""
    zarr = pytest.importorskip("zarr")
    out = tmp_path / "maps"
    args = ("features", images / "img0.png", images / "img3.png", "--out-dir", out, "--out-format", "ome.zarr",
            "--weights", weights, "--stages", "3,4", "--device", "cpu", "--json")
    r = run_soft(*args, env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    assert statuses(out) == {"img0.png": "done", "img3.png": "done"}
    recs = read_lines(out / "manifest.jsonl")
    assert [Path(o["path"]).name for rec in recs for o in rec["outputs"]] == ["img0.ome.zarr", "img3.ome.zarr"]
    assert all(o["bytes"] > 1000 for rec in recs for o in rec["outputs"])  # the folder's files, added up
    single = tmp_path / "single.ome.zarr"
    r = run_soft("features", images / "img3.png", "--out", single, "--weights", weights, "--stages", "3,4",
                 "--device", "cpu", env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr.decode()
    a, b = zarr.open_group(str(out / "img3.ome.zarr"), mode="r"), zarr.open_group(str(single), mode="r")
    for stage in ("stage3", "stage4"):
        np.testing.assert_array_equal(a[stage]["0"][:], b[stage]["0"][:])

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = out / f".img0.ome.zarr.partial-{dead.stdout.strip()}-x1y2"  # what a killed writer leaves
    (leftover / "stage3").mkdir(parents=True)
    (leftover / "stage3" / "0.0.0").write_bytes(b"half")
    r = run_soft(*args, env=ONE_THREAD_ENV)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and (report["skipped"], report["done"]) == (2, 0) and not leftover.exists()

    chunk = next(p for p in (out / "img0.ome.zarr").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.unlink()
    r = run_soft(*args, env=ONE_THREAD_ENV)
    assert r.returncode == 0 and statuses(out) == {"img0.png": "done", "img3.png": "skipped"}
    assert chunk.is_file()
    assert sorted(p.name for p in out.iterdir()) == [".soft-cohort.lock", "img0.ome.zarr", "img3.ome.zarr",
                                                     "manifest.jsonl"]
