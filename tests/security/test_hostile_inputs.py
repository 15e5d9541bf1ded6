"""Hostile and careless inputs, each run as a user would, under a memory cap (issue 10).

Every command here runs in a subprocess whose address space is capped at
:data:`CAP` (``RLIMIT_AS``): enough for Python, torch and a tiny model, far
below what the hostile files would make an unguarded softcli allocate (a 26 GB
resize, a 3 GB zip member, 66 GB of spill files, a 10⁹-block model). A test
passes only when the input is refused, or handled, within the cap, with one
clean ``error:`` line and the other files' results still written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.conftest import REPO, TINY_CONFIG
from tests.synthetic import ONE_THREAD_ENV
from tests.zygote import ForkedProcess, run_soft_process, soft_process

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux-only")

#: Address-space cap of every command below: torch + a tiny model need ~0.8 GB of it.
CAP = 2 * 2**30
#: One thread keeps the capped processes small and the timings stable on a shared machine.
_ENV = ONE_THREAD_ENV


def _capped_env() -> dict[str, str]:
    env = {**os.environ, **_ENV, "PYTHONPATH": str(REPO)}
    env.pop("SOFTCLI_DEBUG", None)
    return env


def soft_capped(*args: str | os.PathLike[str] | bytes, cwd: Path, timeout: float = 120,
                cap: int = CAP) -> subprocess.CompletedProcess:
    """``soft ARGS`` in a process of its own limited to ``cap`` bytes of address space (forked from the
    session's warm zygote, tests/zygote.py: a real process without the interpreter and torch start-up)."""
    return run_soft_process(list(args), env=_capped_env(), cwd=cwd, cap=cap, timeout=timeout)


def start_capped(*args: str, cwd: Path) -> ForkedProcess | subprocess.Popen:
    """``soft ARGS`` started capped, for the signal tests: Ctrl-C acts as in a terminal."""
    return soft_process(list(args), env=_capped_env(), cwd=cwd, cap=CAP)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("error:")]


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str, rc: int = 1) -> str:
    """Exit ``rc``, no traceback, no 'unexpected', and an error line holding every needle."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == rc, err
    assert "Traceback" not in err and "unexpected" not in err, err
    lines = errors(proc)
    assert any(all(n in ln for n in needles) for ln in lines), err
    return err


# -- files --------------------------------------------------------------------------------------

def tiff_declaring(path: Path, side: int = 100_000, tile: int = 16384) -> int:
    """A tiled TIFF declaring side² 8-bit pixels whose tiles are all empty (about 500 bytes)."""
    n = (-(-side // tile)) ** 2
    arrays = 8 + 2 + 12 * 10 + 4
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, n, arrays), (325, 4, n, arrays + 4 * n)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHII", tag, typ, count, value) if typ == 4 else struct.pack("<HHIHH", tag, typ, count,
                                                                                       value, 0)
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(8 * n)
    path.write_bytes(data)
    return len(data)


def pth_zip_bomb(path: Path, inflated: int = 3 * 2**29) -> None:
    """A torch zip archive whose one storage inflates from a few MB to ``inflated`` bytes (deflate)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    numel = inflated // 4
    pkl = src.read("archive/data.pkl").replace(b"K\x04tq", b"J" + struct.pack("<i", numel) + b"tq")
    pkl = pkl.replace(b"K\x04\x85q", b"J" + struct.pack("<i", numel) + b"\x85q")
    zeros = bytes(64 * 2**20)
    # zipfile deflates 1.5 GB of zeros to ~1.5 MB in a few seconds.
    with zipfile.ZipFile(path, "w") as zf:
        for info in src.infolist():
            if info.filename == "archive/data/0":
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(zi, "w", force_zip64=True) as fh:
                    for _ in range(inflated // len(zeros)):
                        fh.write(zeros)
            else:
                zf.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info.filename))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny softcli checkpoint and a good image, plus the hostile files each test adds."""
    import softcli
    from softcli.checkpoint import save_pretrained

    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=10), d / "ckpt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "good.png")
    return d


def _noise(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


# -- memory before allocation -------------------------------------------------------------------

@pytest.mark.parametrize("model_config", [
    {**TINY_CONFIG, "depths": [1, 1, 10**9, 1]},
    {**TINY_CONFIG, "embed_dims": [8192, 8192, 8192, 8192], "num_heads": [8, 8, 8, 8], "depths": [4, 4, 40, 4]},
], ids=["depth-1e9", "dims-8192"])
def test_config_bomb_refused_before_building(work, tmp_path, model_config):
    """config.json asks for a model far larger than memory: refused with the estimate, nothing built."""
    folder = tmp_path / "bomb"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((work / "ckpt" / "model.safetensors").read_bytes())
    config = json.loads((work / "ckpt" / "config.json").read_text())
    config["model_config"] = model_config
    (folder / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    proc = soft_capped("classify", work / "good.png", "--weights", folder, cwd=tmp_path)
    assert_clean_failure(proc, str(folder / "model.safetensors"), "needs about", "refusing to build")
    assert time.monotonic() - start < 60


def test_inferred_config_bomb_refused(work, tmp_path):
    """A safetensors file whose key names imply 10⁹ blocks (no config at all): refused from the inferred config."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(work / "ckpt" / "model.safetensors"))
    block = next(k for k in sd if k.startswith("stages.2.blocks.0."))
    sd[block.replace("blocks.0.", f"blocks.{10**9 - 1}.")] = sd[block].clone()
    save_file(sd, str(tmp_path / "deep.safetensors"))
    proc = soft_capped("features", work / "good.png", "--out", "f.npz", "--weights", "deep.safetensors",
                       cwd=tmp_path)
    assert_clean_failure(proc, "deep.safetensors", "needs about", "refusing to build")


def test_segmentation_head_config_bomb_refused(tmp_path):
    """A segmentation config.json whose head claims 10⁷ FPN channels: checked against the weights, not built."""
    import softcli
    from softcli.models.segmentation import HeadConfig, SemanticFPNHead, SoftSegmenter
    from softcli.segment import save_segmenter

    torch.manual_seed(0)
    backbone = softcli.create_model(TINY_CONFIG, num_classes=0)
    model = SoftSegmenter(backbone, SemanticFPNHead(backbone.config.embed_dims, HeadConfig(num_classes=3,
                                                                                           fpn_channels=16,
                                                                                           channels=16, groups=4)))
    save_segmenter(model, tmp_path / "seg", ["a", "b", "c"])
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    config["head"]["fpn_channels"] = 10**7
    (tmp_path / "seg" / "config.json").write_text(json.dumps(config))
    Image.fromarray(_noise(np.random.default_rng(5), 64, 64, 3)).save(tmp_path / "img.png")
    proc = soft_capped("segment", "img.png", "--out", "m.png", "--weights", "seg", cwd=tmp_path)
    assert_clean_failure(proc, "fpn_channels = 10000000", "the weights have 16")


def test_pth_zip_bomb_refused_before_inflating(work, tmp_path):
    """A 1.5 MB .pth whose storage inflates to 1.5 GB: refused from the zip directory, not by running out."""
    pth_zip_bomb(tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 8 * 2**20
    proc = soft_capped("classify", work / "good.png", "--weights", "bomb.pth", cwd=tmp_path)
    assert_clean_failure(proc, "bomb.pth", "refusing to inflate", "zip bomb")


@pytest.mark.parametrize("command", ["features", "segment", "classify"])
def test_tiny_tiff_declaring_100000_squared_refused(work, tmp_path, command):
    """~500 bytes declaring 100000² pixels: refused from the header; no spill files, no hours of empty tiles."""
    assert tiff_declaring(tmp_path / "bomb.tif") < 600
    # Tiles of 16384² pass the default pixel limit; classify decodes whole, so its limit is lifted (0).
    args = {"features": ["--out", "f.safetensors"], "segment": ["--out", "m.tif", "--clusters", "2"],
            "classify": ["--max-pixels", "0"]}[command]
    proc = soft_capped(command, "bomb.tif", *args, "--weights", work / "ckpt", cwd=tmp_path, timeout=90)
    assert_clean_failure(proc, "bomb.tif", "100000x100000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tif"]  # no outputs, no .soft-maps-*/.soft-mask-*


def test_whole_decode_beyond_memory_refused_without_pixel_limit(work, tmp_path):
    """With --max-pixels 0 a PNG declaring 60000² (10 GB as float RGB) is refused by the memory check."""
    import zlib

    from PIL import PngImagePlugin  # noqa: F401 - make sure Pillow's PNG plugin exists

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    proc = soft_capped("classify", "huge.png", work / "good.png", "--weights", work / "ckpt", "--max-pixels", "0",
                       "--json", cwd=tmp_path)
    assert_clean_failure(proc, "huge.png", "60000x60000", "available")
    doc = json.loads(proc.stdout)
    assert "error" in doc[0] and doc[1]["predictions"]


def test_extreme_aspect_ratio_classify(work, tmp_path):
    """3x100000: the default crop works in bounded memory; --full-res with a one-pass budget is refused."""
    rng = np.random.default_rng(1)
    Image.fromarray(_noise(rng, 3, 100_000, 3)).save(tmp_path / "line.png")
    Image.fromarray(_noise(rng, 100_000, 3, 3)).save(tmp_path / "column.png")
    proc = soft_capped("classify", "line.png", "column.png", work / "good.png", "--weights", work / "ckpt", "--json",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert [d["input_size"] for d in doc] == [[224, 224]] * 3 and all(d["predictions"] for d in doc)
    # A budget that asks for one pass at full resolution is refused by the estimate, that image only.
    proc = soft_capped("classify", "line.png", work / "good.png", "--weights", work / "ckpt", "--json",
                       "--full-res", "--max-memory", "100GB", cwd=tmp_path)
    assert_clean_failure(proc, "line.png", "at full resolution", "more than the")
    doc = json.loads(proc.stdout)
    assert "error" in doc[0] and doc[1]["predictions"]


@pytest.mark.parametrize("length", [20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_extreme_aspect_ratio_full_res_streams_in_global_context(work, tmp_path, length):
    """3xN --full-res: 32x(N·32/3) after the minimum-side resize; one pass would not fit the 2 GB cap,
    so the default context streams it exactly (global). 3x100000 (32x1066667, ~13 s) runs under -m slow."""
    rng = np.random.default_rng(1)
    Image.fromarray(_noise(rng, 3, length, 3)).save(tmp_path / "line.png")
    proc = soft_capped("classify", "line.png", work / "good.png", "--weights", work / "ckpt", "--json",
                       "--full-res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert doc[0]["input_size"] == [32, round(length * 32 / 3)] and doc[0]["context"].startswith("global")
    assert doc[0]["predictions"] and doc[1]["predictions"]


def in_process(args: list[str | os.PathLike[str]], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``soft ARGS`` through the CLI's own ``main`` in this process (argument checks only: no cap needed)."""
    from softcli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return int(exc.value.code or 0), capsys.readouterr().err


RUNS = {"classify": [], "features": ["--out", "f.npz"], "segment": ["--out", "m.png", "--clusters", "2"]}


def test_max_pixels_zero_is_no_limit(work, tmp_path):
    """Every command: 0 = no limit, the image is processed."""
    for command, extra in RUNS.items():
        proc = soft_capped(command, work / "good.png", *extra, "--weights", work / "ckpt", "--max-pixels", "0",
                           cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr.decode())
    assert (tmp_path / "f.npz").is_file() and (tmp_path / "m.png").is_file()


@pytest.mark.parametrize("command", list(RUNS))
def test_negative_max_pixels_is_a_usage_error(work, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    rc, err = in_process([command, work / "good.png", *RUNS[command], "--weights", work / "ckpt",
                          "--max-pixels", "-5"], capsys)
    assert rc == 2 and err.startswith("error: --max-pixels must be 0 (no limit) or a positive number"), err
    assert list(tmp_path.iterdir()) == []


def test_profile_tokens_beyond_memory_refused_before_any_work(tmp_path):
    for args, needle in ((["--tokens", str(10**11)], "more than the"),
                         (["--tokens", "4096", "--max-memory", "1MB"], "--max-memory allows")):
        proc = soft_capped("profile", "--device", "cpu", "--in-process", *args, cwd=tmp_path, timeout=60)
        assert_clean_failure(proc, needle, rc=2)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_profile_timeout_must_be_positive_and_finite(capsys, value):
    rc, err = in_process(["profile", "--device", "cpu", "--in-process", "--tokens", "256", "--timeout", value],
                         capsys)
    assert rc == 2 and err.startswith("error: --timeout must be a positive number"), err


# -- isolation and names ------------------------------------------------------------------------

def _broken_tiffs(folder: Path) -> list[str]:
    """A zlib stream of garbage, a zero tile width, tile offsets past the end: each a TIFF a decoder chokes on."""
    rng = np.random.default_rng(2)
    img = _noise(rng, 64, 64, 3)

    def tag_offsets(path: Path) -> tuple[dict[str, tuple[int, int]], tuple[int, ...], tuple[int, ...]]:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = {t.name: (t.valueoffset, t.count) for t in page.tags.values()}
            return tags, tuple(page.dataoffsets), tuple(page.databytecounts)

    tifffile.imwrite(folder / "zlib_garbage.tif", img, tile=(32, 32), compression="zlib")
    _, offs, counts = tag_offsets(folder / "zlib_garbage.tif")
    data = bytearray((folder / "zlib_garbage.tif").read_bytes())
    for o, c in zip(offs, counts):
        data[o:o + c] = _noise(rng, c).tobytes()
    (folder / "zlib_garbage.tif").write_bytes(bytes(data))

    tifffile.imwrite(folder / "zero_tile.tif", img, tile=(32, 32))
    tags, _, _ = tag_offsets(folder / "zero_tile.tif")
    data = bytearray((folder / "zero_tile.tif").read_bytes())
    data[tags["TileWidth"][0]:tags["TileWidth"][0] + 4] = struct.pack("<I", 0)
    (folder / "zero_tile.tif").write_bytes(bytes(data))

    tifffile.imwrite(folder / "bad_offsets.tif", img, tile=(32, 32), compression="zlib")
    tags, _, _ = tag_offsets(folder / "bad_offsets.tif")
    data = bytearray((folder / "bad_offsets.tif").read_bytes())
    pos, n = tags["TileOffsets"]
    data[pos:pos + 4 * n] = struct.pack(f"<{n}I", *([0xFFFFFF00] * n))
    (folder / "bad_offsets.tif").write_bytes(bytes(data))
    return ["zlib_garbage.tif", "zero_tile.tif", "bad_offsets.tif"]


def test_undecodable_files_are_skipped_and_the_rest_written(work, tmp_path):
    bad = _broken_tiffs(tmp_path)
    names = [bad[0], str(work / "good.png"), *bad[1:]]
    proc = soft_capped("classify", *names, "--weights", work / "ckpt", "--json", "--csv", "out.csv", cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and "unexpected" not in err, err
    for name in bad:
        assert any(ln.startswith(f"error: {name}: ") for ln in errors(proc)), err
    doc = json.loads(proc.stdout)
    assert [d["image"] for d in doc] == names
    assert doc[1]["predictions"] and all("error" in d for i, d in enumerate(doc) if i != 1)
    rows = list(csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8")))
    assert {r["image"] for r in rows} == set(names)
    for name in bad:  # features reads tile by tile: the same files fail there with one line too
        proc = soft_capped("features", name, "--out", "f.npz", "--weights", work / "ckpt", cwd=tmp_path)
        assert_clean_failure(proc, f"{name}: ")


def test_non_utf8_file_names(work, tmp_path):
    """A file name that is not UTF-8: JSON stays valid UTF-8 (escaped name + exact path_bytes), CSV and legend too."""
    raw = b"scan-\xff\xfe.png"
    name = os.fsdecode(raw)
    (tmp_path / name).write_bytes((work / "good.png").read_bytes())
    proc = soft_capped("classify", raw, "--weights", work / "ckpt", "--json", "--csv", b"out-\xff.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout.decode("utf-8"))  # strict UTF-8
    assert doc[0]["image"] == "scan-\\xff\\xfe.png" and bytes.fromhex(doc[0]["path_bytes"]) == raw
    text = (tmp_path / os.fsdecode(b"out-\xff.csv")).read_bytes().decode("utf-8")
    assert "scan-\\xff\\xfe.png" in text

    proc = soft_capped("segment", raw, "--out", b"mask-\xff.png", "--clusters", "2", "--weights", work / "ckpt",
                       "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout.decode("utf-8"))
    legend = json.loads((tmp_path / os.fsdecode(b"mask-\xff.legend.json")).read_bytes().decode("utf-8"))
    assert summary["input"] == legend["source"] == "scan-\\xff\\xfe.png"


def test_output_that_is_the_model_is_refused(work, tmp_path):
    """--out/--csv naming the weights file or its config.json: refused before anything is written."""
    import shutil

    ckpt = Path(shutil.copytree(work / "ckpt", tmp_path / "ckpt"))  # a copy: a failure must not spoil the others
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    weights = ckpt / "model.safetensors"
    proc = soft_capped("features", work / "good.png", "--out", weights, "--weights", ckpt, cwd=tmp_path)
    assert_clean_failure(proc, str(weights), "model being used")
    proc = soft_capped("classify", work / "good.png", "--csv", ckpt / "config.json", "--weights", weights,
                       cwd=tmp_path)
    assert_clean_failure(proc, "config.json", "model being used")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".soft-") or ".partial-" in p.name)


@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, b"error: terminated"),
                                                (signal.SIGINT, 130, b"error: interrupted")])
def test_sigterm_removes_spill_files(work, tmp_path, signum, code, message):
    """SIGTERM or Ctrl-C (SIGINT) in the middle of a disk-spilling features run: one error line, the exit
    status of the signal, and the .soft-maps-* folder goes."""
    rng = np.random.default_rng(3)
    Image.fromarray(_noise(rng, 2048, 2048, 3)).save(tmp_path / "big.png")
    proc = start_capped("features", "big.png", "--out", "f.safetensors", "--weights", str(work / "ckpt"),
                        "--max-memory", "64MB", "--tile", "128", "--overlap", "32", "--no-resume",
                        cwd=tmp_path)  # ~500 tiles; --no-resume: spill to a PID-named folder, not a kept state
    try:
        deadline = time.monotonic() + 90
        while not any(n.startswith(".soft-maps-") for n in _temporaries(tmp_path)):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "no spill folder appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err.decode()
    assert err.strip().splitlines()[-1] == message and b"Traceback" not in err, err.decode()
    assert _temporaries(tmp_path) == [] and not (tmp_path / "f.safetensors").exists()


def test_stale_temporaries_of_dead_runs_are_removed(work, tmp_path):
    """What kill -9 left (a dead PID in the name) is swept by the next run there; a live run's is kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".soft-maps-{dead}-x1").mkdir()
    (tmp_path / f".soft-maps-{dead}-x1" / "stage1.f32").write_bytes(b"0" * 100)
    (tmp_path / f".soft-mask-{dead}-x2").mkdir()
    (tmp_path / f".f.npz.partial-{dead}").write_bytes(b"half")
    alive = f".soft-maps-{os.getpid()}-x3"
    (tmp_path / alive).mkdir()
    proc = soft_capped("features", work / "good.png", "--out", "f.npz", "--weights", work / "ckpt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert _temporaries(tmp_path) == [alive]


def test_disk_space_checked_before_a_long_run(tiny_model, tmp_path, monkeypatch):
    """Spill files and output that cannot fit the free disk: refused with the numbers, before any tile runs."""
    from softcli.errors import OutputError
    from softcli.features import extract_features
    from softcli.io import atomic

    monkeypatch.setattr(atomic, "free_disk", lambda folder: 1000)
    tiles: list[int] = []
    with pytest.raises(OutputError, match=r"need about .* of disk space, but only 1000 B is free"):
        extract_features(tiny_model, np.zeros((256, 256, 3), np.float32), tmp_path / "f.npz",
                         on_tile=lambda done, total: tiles.append(done))
    assert tiles == [] and list(tmp_path.iterdir()) == []


# -- CLI errors and wrong content ---------------------------------------------------------------

@pytest.mark.parametrize("args", [["features", "missing.png", "--out", "f.npz", "--debug"],
                                  ["features", "--debug", "missing.png", "--out", "f.npz"],
                                  ["--debug", "features", "missing.png", "--out", "f.npz"]],
                         ids=["at-the-end", "after-the-subcommand", "before-it"])
def test_debug_anywhere_raises_the_real_error(tmp_path, monkeypatch, args):
    """The hint says 'run with --debug': appending it to the command line works and shows the real exception."""
    from softcli.cli.app import main
    from softcli.errors import InputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="missing.png: no such file"):
        main(args)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys")
def test_segment_out_in_sys_caught_before_computing(work, tmp_path):
    proc = soft_capped("segment", work / "good.png", "--out", "/sys/mask.png", "--clusters", "2", "--weights",
                       work / "ckpt", cwd=tmp_path)
    assert_clean_failure(proc, "/sys/mask.png")


def test_wrong_content_refused_or_sniffed(work, tmp_path):
    rng = np.random.default_rng(4)
    tifffile.imwrite(tmp_path / "volume.tif", _noise(rng, 8, 64, 64), volumetric=True, tile=(8, 32, 32),
                     photometric="minisblack")
    Image.fromarray(_noise(rng, 40, 50, 3)).save(tmp_path / "photo.tif", format="JPEG")  # a JPEG named .tif
    proc = soft_capped("classify", "volume.tif", "photo.tif", "--weights", work / "ckpt", "--json", cwd=tmp_path)
    assert_clean_failure(proc, "volume.tif", "volumetric")
    doc = json.loads(proc.stdout)
    assert "error" in doc[0] and doc[1]["predictions"] and doc[1]["input_size"] == [224, 224]

    from safetensors.torch import load_file

    sd = load_file(str(work / "ckpt" / "model.safetensors"))
    key = next(k for k in sd if k.endswith("attn.proj.weight"))
    sd[key] = sd[key].to(torch.complex64)
    torch.save(sd, tmp_path / "complex.pth")
    proc = soft_capped("classify", work / "good.png", "--weights", "complex.pth", cwd=tmp_path)
    assert_clean_failure(proc, "complex.pth", key, "complex64")

    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "model.safetensors").write_bytes((work / "ckpt" / "model.safetensors").read_bytes())
    config = json.loads((work / "ckpt" / "config.json").read_text())
    config["labels"] = ["cat", "dog", "bird"]  # the model has 10 classes
    (labelled / "config.json").write_text(json.dumps(config))
    proc = soft_capped("classify", work / "good.png", "--weights", labelled, cwd=tmp_path)
    assert_clean_failure(proc, "config.json", "3 names", "10 classes")


def test_memory_available_honours_cgroup_and_address_space_limits(tmp_path):
    """The figure every check above compares with: the smallest of free RAM, a cgroup limit and ulimit -v."""
    from softcli import resources

    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert resources._cgroup_left(str(tmp_path)) == 600000
    (tmp_path / "memory.max").write_text("max\n")
    assert resources._cgroup_left(str(tmp_path)) is None
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31)); "
            "from softcli.resources import available_memory; print(available_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert 0 < int(out) < 2**31
