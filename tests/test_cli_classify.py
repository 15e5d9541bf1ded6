"""``soft classify`` as a user runs it: a subprocess on real files of every kind, broken ones included."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.conftest import GOLDEN, run_soft, run_soft_subprocess

LABELS = [f"thing {i}" for i in range(10)]
GOOD = ["photo.jpg", "photo.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep16.tif", "rotated.jpg"]
BAD = {"truncated.jpg": "truncated or corrupt", "empty.png": "empty file", "notes.jpg": "not an image"}
#: (H, W) each good file is seen at (rotated.jpg is stored 40x80 with EXIF "rotate 90°").
SIZES = {"photo.jpg": (48, 64), "photo.png": (48, 64), "gray.png": (50, 70), "rgba.png": (40, 40),
         "palette.png": (36, 52), "cmyk.jpg": (45, 60), "deep16.tif": (33, 47), "rotated.jpg": (80, 40)}
PRED_KEYS = {"rank", "index", "label", "prob"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A softcli checkpoint built here, and one file of every kind the command must handle."""
    import softcli
    from softcli.checkpoint import save_pretrained
    from tests.conftest import TINY_CONFIG

    d = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=10), d / "ckpt", labels=LABELS)
    rng = np.random.default_rng(0)

    def noise(h, w, c=3):
        return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)

    Image.fromarray(noise(48, 64)).save(d / "photo.jpg", quality=90)
    Image.fromarray(noise(48, 64)).save(d / "photo.png")
    Image.fromarray(noise(50, 70, 0), "L").save(d / "gray.png")
    Image.fromarray(noise(40, 40, 4), "RGBA").save(d / "rgba.png")
    Image.fromarray(noise(36, 52)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    Image.fromarray(noise(45, 60)).convert("CMYK").save(d / "cmyk.jpg")
    tifffile.imwrite(d / "deep16.tif", rng.integers(0, 65536, (33, 47, 3), dtype=np.uint16), photometric="rgb")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    Image.fromarray(noise(40, 80)).save(d / "rotated.jpg", exif=exif)
    whole = (d / "photo.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not a picture\n")
    assert Image.open(d / "cmyk.jpg").mode == "CMYK" and Image.open(d / "palette.png").mode == "P"
    assert tifffile.imread(d / "deep16.tif").dtype == np.uint16
    return d


def _error_lines(stderr: bytes | str) -> list[str]:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def _in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """``soft ARGS`` through the console script's own ``main``, without a new interpreter (faster)."""
    from softcli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_every_kind_of_file_json_and_broken_ones(workdir):
    """A smoke test of the real process: exit status, clean JSON on stdout, error lines on stderr."""
    names = GOOD[:4] + list(BAD) + GOOD[4:]  # broken files in the middle: the rest still run
    r = run_soft_subprocess("classify", *names, "--weights", "ckpt", "--json", "--batch-size", "3", cwd=workdir)
    assert r.returncode == 1, r.stderr.decode()
    assert b"Traceback" not in r.stderr
    doc = json.loads(r.stdout)  # stdout is one JSON document and nothing else
    assert [o["image"] for o in doc] == names
    errors = _error_lines(r.stderr)
    assert len(errors) == len(BAD)
    for name, reason in BAD.items():
        assert sum(ln.startswith(f"error: {name}: ") and reason in ln for ln in errors) == 1, errors
    for obj in doc:
        assert obj["model"] == "ckpt" and isinstance(obj["seconds"], float) and obj["seconds"] >= 0
        if obj["image"] in BAD:
            assert set(obj) == {"image", "error", "model", "input_size", "input_width", "input_height", "seconds"}
            assert "predictions" not in obj
            assert BAD[obj["image"]] in obj["error"]
            continue
        assert set(obj) == {"image", "predictions", "model", "input_size", "input_width", "input_height", "seconds"}
        assert obj["input_size"] == [224, 224]
        preds = obj["predictions"]
        assert len(preds) == 5 and all(set(p) == PRED_KEYS for p in preds)
        assert [p["rank"] for p in preds] == [1, 2, 3, 4, 5]
        probs = [p["prob"] for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(p["label"] == LABELS[p["index"]] for p in preds)


def test_full_res_sees_each_image_whole_exif_applied(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code, out, err = _in_process(["classify", *GOOD, "--weights", "ckpt", "--json", "--full-res", "-k", "2"], capsys)
    assert code == 0, err
    assert not _error_lines(err)
    doc = json.loads(out)
    assert {o["image"]: tuple(o["input_size"]) for o in doc} == SIZES
    assert all((o["input_height"], o["input_width"]) == tuple(o["input_size"]) for o in doc)
    assert all(len(o["predictions"]) == 2 for o in doc)


def test_tables_on_stdout_and_csv(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code, out, err = _in_process(["classify", "photo.png", "gray.png", "--weights", "ckpt", "--csv", "out.csv",
                                  "-k", "3"], capsys)
    assert code == 0, err
    assert "photo.png" in out and "gray.png" in out and "thing" in out and "input 224x224" in out
    rows = list(csv.DictReader((workdir / "out.csv").open()))
    assert [(row["image"], row["rank"]) for row in rows] == [
        ("photo.png", "1"), ("photo.png", "2"), ("photo.png", "3"),
        ("gray.png", "1"), ("gray.png", "2"), ("gray.png", "3")]
    assert all(row["label"] == LABELS[int(row["index"])] and not row["error"] for row in rows)


def test_usage_and_output_errors(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    before = (workdir / "photo.png").read_bytes()
    for args, code, text in [
        (["photo.png", "--weights", "ckpt", "--top-k", "0"], 2, "--top-k"),
        (["photo.png", "--weights", "ckpt", "--model", "ckpt"], 2, "not both"),
        ([], 2, "INPUT"),
        (["photo.png", "--weights", "ckpt", "--csv", "photo.png"], 1, "refusing to overwrite an input"),
        (["photo.png", "--weights", "no-such-ckpt.pth"], 1, "no such file"),
    ]:
        got, out, err = _in_process(["classify", *args], capsys)
        errors = _error_lines(err)
        assert got == code and len(errors) == 1 and text in errors[0], (args, err)
        assert "Traceback" not in err and out == ""
    assert (workdir / "photo.png").read_bytes() == before


def test_default_model_without_network_says_what_to_do(workdir, tmp_path):
    """No --model/--weights means the registry default; offline with an empty cache that is one clear line."""
    from tests.hub_server import free_port_closed, hub_env

    env = hub_env(tmp_path / "hf", f"http://127.0.0.1:{free_port_closed()}", HF_HUB_OFFLINE="1")
    proc = run_soft("classify", "photo.png", env=env, cwd=workdir)
    errors = _error_lines(proc.stderr.decode())
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "soft_tiny" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0] and "--weights" in errors[0]
    assert b"Traceback" not in proc.stderr


def test_max_pixels_guard(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code, out, err = _in_process(["classify", "photo.png", "gray.png", "--weights", "ckpt", "--max-pixels", "3200",
                                  "--json"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert "predictions" in doc[0] and "decompression-bomb guard" in doc[1]["error"]  # 48x64 fits, 50x70 not
    assert len(_error_lines(err)) == 1


@pytest.mark.golden
def test_golden_weights_probabilities_are_softmax_of_load_model_logits(tmp_path):
    """The printed probabilities are exactly what the Python API's model gives for the same tensor."""
    import softcli
    from softcli.io.image import load_image
    from softcli.preprocess import Preprocess, eval_transform

    weights = GOLDEN / "soft_tiny.weights.safetensors"
    rng = np.random.default_rng(1)
    img = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)).save(img)
    r = run_soft("classify", img, "--weights", weights, "--json", "--top-k", "10", "--device", "cpu")
    assert r.returncode == 0, r.stderr.decode()
    preds = json.loads(r.stdout)[0]["predictions"]

    model = softcli.load_model(weights)
    x = eval_transform(load_image(img), Preprocess.for_model(model))
    with torch.no_grad():
        probs = torch.softmax(model(x[None]), dim=-1)[0]
    top = torch.argsort(probs, descending=True)[:10].tolist()
    assert [p["index"] for p in preds] == top
    for p in preds:
        assert p["prob"] == pytest.approx(probs[p["index"]].item(), rel=1e-5, abs=1e-7)
    from softcli.labels import imagenet_classes

    assert [p["label"] for p in preds] == [imagenet_classes()[i] for i in top]  # 1000 classes, no labels


@pytest.mark.parametrize("full_res", [False, True])
def test_landmarks_reach_the_model(workdir, monkeypatch, capsys, full_res):
    """--landmarks works on classify as on every command that runs a model, --full-res included."""
    import softcli.cli.classify as cli_classify
    from softcli.models.landmarks import LandmarkPolicy

    monkeypatch.chdir(workdir)
    policies = []
    load = cli_classify.common.load_cli_model

    def recording_load(*args, **kwargs):
        net = load(*args, **kwargs)
        policies.append(net.landmark_policy)
        return net

    monkeypatch.setattr(cli_classify.common, "load_cli_model", recording_load)
    extra = ["--full-res"] if full_res else []
    code, out, err = _in_process(["classify", "photo.png", "--weights", "ckpt", "--json", "--landmarks", "7",
                                  *extra], capsys)
    assert code == 0, err
    assert policies == [LandmarkPolicy(mode="budget", budget=7)] and json.loads(out)[0]["predictions"]
    code, _, err = _in_process(["classify", "photo.png", "--weights", "ckpt", "--landmarks", "many", *extra], capsys)
    assert code == 2 and err.startswith("error:") and "landmark" in err and len(policies) == 1, err
