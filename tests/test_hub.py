"""Model specs → weights, against real loopback servers speaking the Hub and Drive protocols.

Everything that touches huggingface_hub runs in a subprocess with its own
HF_HOME/HF_ENDPOINT (huggingface_hub reads them at import), so the user's
real cache is never touched and nothing reaches the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import softcli
from softcli import weights
from softcli.checkpoint import read_checkpoint, save_pretrained
from softcli.errors import CheckpointError, UsageError
from tests.conftest import GOLDEN, REPO, TINY_CONFIG, run_soft
from tests.hub_server import FakeDrive, FakeHub, free_port_closed, hf, hub_env, no_internet  # noqa: F401 (fixtures)
from tests.zygote import run_python

PROBE = """
import json, sys, torch, softcli
torch.manual_seed(0)
x = torch.randn(1, 3, 64, 64)
m = softcli.load_model(sys.argv[1])
with torch.no_grad():
    y = m(x)
print(json.dumps({"logits": y.flatten().tolist(), "source": str(m.source)}))
"""


def probe(spec: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Load ``spec`` with softcli.load_model in a process of its own (forked from the warm zygote, which has
    not imported huggingface_hub); logits of a fixed input as JSON."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    r = run_python(PROBE, [spec], env=full, timeout=120)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def logits_of(model: torch.nn.Module) -> list[float]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return model(x).flatten().tolist()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two different tiny models saved in the softcli layout (for two commits)."""
    root = tmp_path_factory.mktemp("tiny")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = softcli.create_model(TINY_CONFIG, num_classes=10)
        labels = [f"class_{i}" for i in range(10)]
        folder = save_pretrained(model, root / f"m{seed}", labels=labels)
        out.append((folder, logits_of(model)))
    return out


@pytest.fixture(scope="module")
def fake_hub(tiny_pair):
    with FakeHub() as server:
        (f0, _), (f1, _) = tiny_pair
        server.v1 = server.add_commit("acme/soft-mini", folder_files(f0), tag="v1")
        server.v2 = server.add_commit("acme/soft-mini", folder_files(f1))
        server.add_commit("acme/bare", {"model.safetensors": (f0 / "model.safetensors").read_bytes()})
        yield server


def _ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def down_url() -> str:
    return f"http://127.0.0.1:{free_port_closed()}"


def test_load_model_pulls_then_works_offline(fake_hub, tiny_pair, tmp_path):
    """The real environment variables, in fresh processes: HF_HOME + HF_ENDPOINT, then HF_HUB_OFFLINE=1."""
    env = hub_env(tmp_path / "hf", fake_hub.url)
    online = _ok(probe("hf-hub:acme/soft-mini", env))
    assert online["logits"] == pytest.approx(tiny_pair[1][1], abs=1e-6)  # main = second commit
    assert f"snapshots/{fake_hub.v2}" in online["source"]
    assert (tmp_path / "hf/hub/models--acme--soft-mini/refs/main").read_text() == fake_hub.v2

    seen = len(fake_hub.requests)
    offline = _ok(probe("hf-hub:acme/soft-mini", {**env, "HF_HUB_OFFLINE": "1"}))
    assert offline["logits"] == online["logits"]
    assert len(fake_hub.requests) == seen, "offline use must not touch the server"


def test_cache_is_used_when_the_hub_is_down(fake_hub, hf):
    hf(fake_hub.url)
    first = weights.resolve_weights("hf-hub:acme/soft-mini")
    hf(down_url())
    again = weights.resolve_weights("hf-hub:acme/soft-mini")
    assert again.path == first.path and again.commit == fake_hub.v2


def test_revision_pinning(fake_hub, tiny_pair, hf):
    hf(fake_hub.url)
    tagged = weights.resolve_weights("hf-hub:acme/soft-mini@v1")
    assert tagged.commit == fake_hub.v1 and tagged.path.name == fake_hub.v1
    assert logits_of(softcli.load_model(tagged.path)) == pytest.approx(tiny_pair[0][1], abs=1e-6)
    # A commit hash already cached needs no network at all.
    seen = len(fake_hub.requests)
    assert weights.resolve_weights(f"hf-hub:acme/soft-mini@{fake_hub.v1}").path == tagged.path
    assert len(fake_hub.requests) == seen
    # The tag stays resolvable offline; main was never pulled here.
    hf(fake_hub.url, offline=True)
    assert weights.resolve_weights("hf-hub:acme/soft-mini@v1").path == tagged.path
    with pytest.raises(weights.WeightsError, match="not in the cache .* HF_HUB_OFFLINE=1 forbids downloads"):
        weights.resolve_weights("hf-hub:acme/soft-mini")
    assert len(fake_hub.requests) == seen


def test_repo_with_only_safetensors(fake_hub, tiny_pair, hf):
    hf(fake_hub.url)
    model = softcli.load_model("hf-hub:acme/bare")  # config from the safetensors metadata
    assert logits_of(model) == pytest.approx(tiny_pair[0][1], abs=1e-6)


@pytest.mark.parametrize("spec, needle", [
    ("hf-hub:acme/nope", "no model repo hf-hub:acme/nope on http://127.0.0.1"),
    ("hf-hub:acme/soft-mini@v9", "hf-hub:acme/soft-mini has no revision 'v9'"),
])
def test_missing_repo_or_revision(fake_hub, hf, spec, needle):
    hf(fake_hub.url)
    with pytest.raises(weights.HubUnavailable, match=needle):
        weights.resolve_weights(spec)


def test_server_error_is_one_clear_error(fake_hub, hf):
    hf(fake_hub.url)
    fake_hub.fail_status = 500
    try:
        t0 = time.monotonic()
        with pytest.raises(weights.WeightsError, match="not in the cache .*HTTP 500 from 127.0.0.1"):
            weights.resolve_weights("hf-hub:acme/soft-mini")
        assert time.monotonic() - t0 < 20
    finally:
        fake_hub.fail_status = None


def test_server_that_never_answers_times_out(fake_hub, hf, monkeypatch):
    hf(fake_hub.url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    fake_hub.hang = ("/api/models/", 8.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(weights.WeightsError, match="cannot be reached .no answer within 1 s"):
            weights.resolve_weights("hf-hub:acme/soft-mini")
        assert time.monotonic() - t0 < 6
    finally:
        fake_hub.hang = None


def test_server_down_cli_error_line(tmp_path):
    env = hub_env(tmp_path / "hf", down_url())
    t0 = time.monotonic()
    line = _one_error_line(run_soft("weights", "pull", "hf-hub:acme/soft-mini", env=env))
    assert "cannot be reached (connection refused)" in line
    assert "'soft weights pull hf-hub:acme/soft-mini'" in line and "HF_HOME" in line and "--weights" in line
    assert time.monotonic() - t0 < 30


def test_registry_model_without_network_says_what_to_do(tmp_path, hf):
    env = hub_env(tmp_path / "hf", down_url(), HF_HUB_OFFLINE="1")
    line = _one_error_line(run_soft("weights", "pull", "soft_tiny", env=env))
    assert "soft_tiny" in line and "HF_HUB_OFFLINE=1" in line and "--weights" in line and "HF_HOME" in line
    # Online, but neither the Hub nor the official origin answers: a typed error naming no CLI flag, with both
    # causes chained (the CLI adds what to type next, see tests/test_cli_weights.py).
    hf(down_url())
    with pytest.raises(weights.WeightsNotCached, match="cannot be reached.*official release could not be used") as e:
        weights.resolve_weights("soft_tiny")
    assert "--" not in str(e.value) and e.value.spec == "soft_tiny"
    assert isinstance(e.value.__cause__, weights.WeightsError) and "Google Drive" in str(e.value.__cause__)


# -- official-origin fallback ---------------------------------------------------------------

def _mini_registry(tmp_path: Path, drive_id: str, sha256: str | None) -> Path:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    reg = {"default": "mini", "models": {"mini": {
        "architecture": manifest["mini_plain"]["config"], "params": 822878, "top1": None,
        "hub": {"repo_id": "acme/not-published", "revision": "main"},
        "origin": {"kind": "gdrive", "id": drive_id, "format": "safetensors", "official_name": "MINI",
                   "sha256": sha256}}}}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(reg))
    return path


def test_registry_name_pulls_its_pinned_hub_repo(fake_hub, tiny_pair, tmp_path, hf):
    reg = {"models": {"mini": {"architecture": TINY_CONFIG, "params": 1, "top1": None,
                               "hub": {"repo_id": "acme/soft-mini", "revision": "v1"}}}}
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    hf(fake_hub.url, SOFTCLI_REGISTRY=str(tmp_path / "reg.json"))
    entry = weights.load_registry().get("mini")
    assert not weights.is_cached(entry)
    res = weights.resolve_weights(None)  # the registry default
    assert (res.source, res.registry_name, res.commit) == ("hub", "mini", fake_hub.v1)
    assert res.path.name == "model.safetensors" and weights.is_cached(entry)
    assert logits_of(softcli.load_model("mini")) == pytest.approx(tiny_pair[0][1], abs=1e-6)


@pytest.mark.golden
def test_origin_fallback_downloads_verifies_converts_and_rechecks(fake_hub, tmp_path, hf):
    official = GOLDEN / "mini_plain.weights.safetensors"
    digest = hashlib.sha256(official.read_bytes()).hexdigest()
    expected = logits_of(softcli.load_model(official))
    registry = str(_mini_registry(tmp_path, "mini-file-id", digest))
    with FakeDrive(confirm_above=1024) as drive:
        drive.add("mini-file-id", "MINI.safetensors", official.read_bytes())
        hf(fake_hub.url, SOFTCLI_GDRIVE_ENDPOINT=drive.url, SOFTCLI_REGISTRY=registry)
        res = weights.resolve_weights("mini")
        # The large-file flow: the confirm page first, then the form's download URL.
        assert res.source == "origin" and [p.split("?")[0] for _, p in drive.requests] == ["/uc", "/download"]
    folder = res.path
    assert folder == tmp_path / "hf/softcli/origin/mini"
    record = json.loads((folder / "origin.json").read_text())
    assert record["download_sha256"] == digest
    assert record["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((folder / "config.json").read_text())["converted_from"]["official_name"] == "MINI"

    # Later use, in a fresh process: from the local cache (Drive gone, offline), same predictions as the file.
    offline = hub_env(tmp_path / "hf", down_url(), HF_HUB_OFFLINE="1", SOFTCLI_REGISTRY=registry)
    assert _ok(probe("mini", offline))["logits"] == pytest.approx(expected, abs=1e-5)

    # A damaged cache is caught by its sha256.
    weights_file = folder / "model.safetensors"
    tensors = load_file(str(weights_file))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(weights_file))
    hf(down_url(), offline=True, home=tmp_path / "hf", SOFTCLI_REGISTRY=registry)
    with pytest.raises(weights.TamperedFile, match="fail their sha256 check.*must be rebuilt"):
        weights.resolve_weights("mini")


@pytest.mark.golden
def test_origin_official_pth_training_checkpoint(fake_hub, tmp_path, hf):
    """The format the SOFT training script saves: {'model': state_dict, 'args': Namespace}, read weights-only."""
    import argparse

    official = GOLDEN / "mini_plain.weights.safetensors"
    pth = tmp_path / "MINI.pth"
    torch.save({"model": load_file(str(official)), "args": argparse.Namespace(model="mini", lr=1e-3)}, pth)
    registry = json.loads(_mini_registry(tmp_path, "pth-id", None).read_text())
    registry["models"]["mini"]["origin"]["format"] = "pth"
    (tmp_path / "pth-registry.json").write_text(json.dumps(registry))
    with FakeDrive() as drive:
        drive.add("pth-id", "MINI.pth", pth.read_bytes())
        hf(fake_hub.url, SOFTCLI_GDRIVE_ENDPOINT=drive.url, SOFTCLI_REGISTRY=str(tmp_path / "pth-registry.json"))
        model = softcli.load_model("mini")
    assert logits_of(model) == pytest.approx(logits_of(softcli.load_model(official)), abs=1e-6)
    record = json.loads((tmp_path / "hf/softcli/origin/mini/origin.json").read_text())
    assert record["download_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()


@pytest.mark.golden
def test_origin_with_wrong_sha256_is_refused(fake_hub, tmp_path, hf):
    official = (GOLDEN / "mini_plain.weights.safetensors").read_bytes()
    with FakeDrive() as drive:
        drive.add("mini-file-id", "MINI.safetensors", official)
        hf(fake_hub.url, SOFTCLI_GDRIVE_ENDPOINT=drive.url,
           SOFTCLI_REGISTRY=str(_mini_registry(tmp_path, "mini-file-id", "0" * 64)))
        with pytest.raises(weights.WeightsError, match="no model repo hf-hub:acme/not-published.*refusing to use it"):
            weights.resolve_weights("mini")
    assert not (tmp_path / "hf/softcli/origin/mini").exists()


def test_gdrive_download_small_file_and_missing_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    with FakeDrive(confirm_above=1 << 20) as drive:
        drive.add("small", "s.bin", b"abc" * 100)
        weights.gdrive_download("small", tmp_path / "s.bin", endpoint=drive.url)
        assert (tmp_path / "s.bin").read_bytes() == b"abc" * 100
        with pytest.raises(weights.WeightsError, match="no such file or not shared publicly"):
            weights.gdrive_download("nope", tmp_path / "n.bin", endpoint=drive.url)
        with pytest.raises(weights.WeightsError, match="over the 10-byte limit"):
            weights.gdrive_download("small", tmp_path / "big.bin", endpoint=drive.url, max_bytes=10)
    assert not (tmp_path / "n.bin").exists() and not (tmp_path / "big.bin").exists()
    with pytest.raises(weights.WeightsError, match="cannot reach Google Drive"):
        weights.gdrive_download("small", tmp_path / "s2.bin", endpoint=down_url())


def test_gdrive_confirm_form_to_a_foreign_host_is_refused(tmp_path):
    with FakeDrive(confirm_above=0) as drive:
        drive.add("x", "x.bin", b"0123456789")
        drive.form_action = "https://evil.example/download"
        with pytest.raises(weights.WeightsError, match="unexpected host"):
            weights.gdrive_download("x", tmp_path / "x.bin", endpoint=drive.url)
        assert [p.split("?")[0] for _, p in drive.requests] == ["/uc"]


# -- specs, convert, push --------------------------------------------------------------------

def test_parse_hub_spec_and_kinds(tmp_path):
    assert weights.parse_hub_spec("hf-hub:acme/m@v1") == ("acme/m", "v1")
    assert weights.parse_hub_spec("hf-hub:acme/m") == ("acme/m", None)
    for bad in ("hf-hub:acme", "hf-hub:acme/m@", "hf-hub:/m"):
        with pytest.raises(weights.WeightsError):
            weights.parse_hub_spec(bad)
    assert weights.spec_kind("soft_tiny") == "registry"
    assert weights.spec_kind("./soft_tiny") == "path"
    assert weights.spec_kind("hf-hub:a/b") == "hub"
    with pytest.raises(weights.WeightsError, match="unknown model 'soft_tnyi': not a registry name"):
        weights.resolve_weights("soft_tnyi")
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        weights.resolve_weights(str(tmp_path / "missing.pth"))
    assert weights.resolve_weights(tmp_path).kind == "path"  # Path objects are always paths


@pytest.mark.golden
def test_convert_official_checkpoint(tmp_path):
    official = GOLDEN / "mini_plain.weights.safetensors"
    out = weights.convert_checkpoint(official, tmp_path / "mini", labels=[f"c{i}" for i in range(10)], name="mini")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: softcli") and "10 class names" in card
    ck = read_checkpoint(out)
    assert ck.format == "softcli" and ck.labels[3] == "c3"
    assert logits_of(softcli.load_model(out)) == pytest.approx(logits_of(softcli.load_model(official)), abs=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["converted_from"]["sha256"] == hashlib.sha256(official.read_bytes()).hexdigest()
    with pytest.raises(weights.WeightsError, match="holds the input"):
        weights.convert_checkpoint(out / "model.safetensors", out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(weights.WeightsError, match="other files"):
        weights.convert_checkpoint(official, tmp_path / "busy")


@pytest.mark.golden
def test_push_then_pull_round_trip(fake_hub, tmp_path, hf):
    folder = weights.convert_checkpoint(GOLDEN / "mini_plain.weights.safetensors", tmp_path / "mini")
    hf(fake_hub.url, HF_TOKEN="hf_test_token")
    pushed = weights.push_folder(folder, "acme/pushed", private=True)
    assert fake_hub.repos["acme/pushed"].private and fake_hub.validated[-1].startswith("---")
    files = fake_hub.repos["acme/pushed"].commits[pushed["commit"]]
    assert set(files) == {"model.safetensors", "config.json", "README.md"}
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert b"hf-hub:acme/pushed" in files["README.md"] and b"mini_plain.weights.safetensors" in files["README.md"]
    assert "ORG/mini" in (folder / "README.md").read_text()  # the local folder is left as it was

    res = weights.resolve_weights(pushed["spec"])
    assert res.commit == pushed["commit"]
    assert logits_of(softcli.load_model(res.path)) == pytest.approx(logits_of(softcli.load_model(folder)), abs=1e-6)
    # Without a token the private repo is invisible: the message says what to set.
    hf(fake_hub.url, home=tmp_path / "hf2")
    with pytest.raises(weights.HubUnavailable, match="no model repo hf-hub:acme/pushed.*set HF_TOKEN"):
        weights.resolve_weights("hf-hub:acme/pushed")


def test_load_cli_model_rules(tmp_path, tiny_pair, hf):
    from softcli.cli.common import load_cli_model

    hf(down_url(), offline=True)
    with pytest.raises(weights.WeightsError, match="^soft_tiny: its weights are not in the cache"):
        load_cli_model(None, None, "cpu")  # neither given: the registry default

    with pytest.raises(UsageError, match="not both"):
        load_cli_model("soft_tiny", tiny_pair[0][0], "cpu")
    model = load_cli_model(None, tiny_pair[0][0], "cpu")
    assert logits_of(model) == pytest.approx(tiny_pair[0][1], abs=1e-6)


def test_classify_from_hub_then_offline_identical(fake_hub, tmp_path):
    """End to end through 'soft classify' (runs once softcli.cli.classify exists on the merged branch)."""
    pytest.importorskip("softcli.cli.classify", reason="soft classify lives on another branch until merged")
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.effect_mandelbrot((96, 80), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(photo)
    env = hub_env(tmp_path / "hf", fake_hub.url)
    online = run_soft("classify", photo, "--model", "hf-hub:acme/soft-mini", "--json", env=env)
    assert online.returncode == 0, online.stderr
    assert b"class_" in online.stdout  # labels from the pulled config.json
    seen = len(fake_hub.requests)
    offline = run_soft("classify", photo, "--model", "hf-hub:acme/soft-mini", "--json",
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert _predictions(json.loads(offline.stdout)) == _predictions(json.loads(online.stdout))
    assert len(fake_hub.requests) == seen


def _predictions(obj):
    """The JSON output without run-dependent fields (timings, paths of the cache)."""
    if isinstance(obj, dict):
        return {k: _predictions(v) for k, v in obj.items()
                if not any(t in k.lower() for t in ("time", "second", "elapsed", "duration"))}
    if isinstance(obj, list):
        return [_predictions(v) for v in obj]
    return obj


def test_weights_package_names_and_no_torch_at_import():
    """softcli.weights spells out the checkpoint file names (so listing models never imports torch): they must agree,
    and no module of the package imports torch, the checkpoint reader or the models at module level."""
    import ast

    from softcli import checkpoint
    from softcli.weights import hf as weights_hf

    assert (weights_hf.WEIGHTS_NAME, weights_hf.CONFIG_NAME) == (checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME)
    heavy = {"torch", "softcli.checkpoint", "softcli.models", "..checkpoint", "..models"}
    for path in (REPO / "softcli" / "weights").glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only; function-level imports are lazy
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {"." * node.level + (node.module or "")}
            else:
                continue
            assert not names & heavy, f"{path.name} imports {names & heavy} at module level"
