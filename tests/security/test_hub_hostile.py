"""A misbehaving Hub or Drive, and careless specs: nothing is written outside the cache, nothing unverified is used.

Every server here is a real HTTP server on 127.0.0.1 (tests/hub_server.py)
told to misbehave: resolve any revision, answer a path as the commit id,
serve other bytes than it advertises, advertise a path as a blob's hash,
redirect off Google Drive, or drip one byte at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import softcli
from softcli import weights
from softcli.checkpoint import save_pretrained
from softcli.errors import OutputError, SoftError
from softcli.weights.registry import RegistryError, parse_registry
from tests.conftest import GOLDEN, TINY_CONFIG, run_soft
from tests.hub_server import FakeDrive, FakeHub, hf, hub_env, no_internet  # noqa: F401 (fixtures)

REPO_ID = "acme/soft-mini"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    torch.manual_seed(0)
    folder = save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=10), tmp_path_factory.mktemp("m") / "m")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub_server(tiny_files):
    with FakeHub() as server:
        server.sha = server.add_commit(REPO_ID, tiny_files)
        yield server


def files_outside(root: Path, inside: Path) -> list[Path]:
    """Files under ``root`` that are not under ``inside`` (what a traversal would have written)."""
    return [p for p in root.rglob("*") if p.is_file() and inside not in p.parents]


def tampered(data: bytes) -> bytes:
    """Same length, still a valid safetensors file, other weights: the last float's bytes flipped."""
    return data[:-4] + bytes(b ^ 0x55 for b in data[-4:])


# -- revisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("revision", ["../../../victim", "{tmp}/victim", "main/../../../../victim", ".hidden",
                                      "v1.lock", "a//b", "a b", "-x", "x@{1}", "~1", "end/"])
def test_revision_that_is_not_a_ref_is_refused_before_any_path(hub_server, hf, tmp_path, revision):
    revision = revision.replace("{tmp}", str(tmp_path))
    home = hf(hub_server.url)
    hub_server.any_revision = True  # a careless server resolves anything: softcli must not rely on it refusing
    with pytest.raises(weights.WeightsError) as refused:
        weights.resolve_weights(f"hf-hub:{REPO_ID}@{revision}")
    assert files_outside(tmp_path, home / "hub") == []  # first: today's main wrote refs/REVISION outside
    assert "is not a branch, tag or 40-hex commit" in str(refused.value)
    assert not (home / "hub").exists() and hub_server.requests == []


def test_refs_and_commits_that_are_fine():
    from softcli.weights.registry import revision_problem

    for ok in ("main", "v1.0", "refs/pr/1", "feature/x-y_z", "a" * 40, "release-2024.01"):
        assert revision_problem(ok) is None, ok


def test_revision_traversal_cli_is_one_error_line(hub_server, tmp_path):
    hub_server.any_revision = True
    env = hub_env(tmp_path / "hf", hub_server.url)
    r = run_soft("weights", "pull", f"hf-hub:{REPO_ID}@../../../../victim", env=env)
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err
    expected = (f"error: hf-hub:{REPO_ID}@../../../../victim: '../../../../victim' is not a branch, tag or "
                "40-hex commit (it contains '..', '//' or '@{')")
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [expected]
    assert not list(tmp_path.rglob("victim"))


def test_registry_revision_and_names_are_checked():
    def reg(name: str = "m", revision: str = "main", official: str = "M", filename: str = "model.safetensors") -> str:
        return json.dumps({"models": {name: {"architecture": {}, "params": 1, "top1": None,
                                             "hub": {"repo_id": "a/b", "revision": revision, "filename": filename},
                                             "origin": {"kind": "gdrive", "format": "pth", "id": "x",
                                                        "official_name": official}}}})
    parse_registry(reg(), "ok.json")
    for bad in (reg(revision="../../x"), reg(name="../../x"), reg(official="../x"), reg(name=".hidden"),
                reg(filename="../../../etc/passwd"), reg(revision="/tmp/x")):
        with pytest.raises(RegistryError, match="bad registry"):
            parse_registry(bad, "bad.json")


# -- the commit id the server answers ----------------------------------------------------------------

@pytest.mark.parametrize("answer", ["../../../../victim", "{tmp}/victim", "0" * 39 + "/", "A" * 40, ""])
def test_commit_id_that_is_not_40_hex_is_refused(hub_server, hf, tmp_path, answer):
    answer = answer.replace("{tmp}", str(tmp_path))
    home = hf(hub_server.url)
    hub_server.any_revision = True
    hub_server.answer_sha = answer or None
    if not answer:  # an empty answer: the real sha is hidden by a server that sends "sha": ""
        hub_server.answer_sha = " "
    with pytest.raises(weights.WeightsError) as refused:
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    assert files_outside(tmp_path, home / "hub") == []  # first: today's main wrote refs/SHA outside
    assert "not 40 hex digits; refusing" in str(refused.value)
    assert not (home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots").exists()


# -- bytes that are not what the Hub advertises --------------------------------------------------

def test_wrong_bytes_are_refused_deleted_and_fetched_again_later(hub_server, hf, tiny_files):
    home = hf(hub_server.url)
    good = tiny_files["model.safetensors"]
    hub_server.swap_bytes["model.safetensors"] = tampered(good)
    with pytest.raises(weights.WeightsError, match=r"model.safetensors has sha256 [0-9a-f]{64}, expected "
                                               + hashlib.sha256(good).hexdigest() + "; the file was deleted"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    storage = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    assert not (storage / "blobs" / hashlib.sha256(good).hexdigest()).exists()
    assert not (storage / "snapshots" / hub_server.sha / "model.safetensors").exists()
    # Offline, the half-downloaded snapshot is not used either.
    hf(hub_server.url, offline=True)
    with pytest.raises(weights.WeightsError, match="not in the cache"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    # The server is fixed: the next pull downloads the real bytes.
    hub_server.swap_bytes.clear()
    hf(hub_server.url)
    res = weights.resolve_weights(f"hf-hub:{REPO_ID}")
    assert (res.path / "model.safetensors").read_bytes() == good


def test_wrong_bytes_in_a_small_git_file_are_refused(hub_server, hf, tiny_files):
    hf(hub_server.url)
    config = tiny_files["config.json"]
    hub_server.swap_bytes["config.json"] = config.replace(b'"softcli"', b'"SOFTCLI"')
    with pytest.raises(weights.WeightsError, match="config.json has git-sha1"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")


def test_poisoned_cache_is_not_trusted_later(hub_server, hf, tiny_files):
    home = hf(hub_server.url)
    res = weights.resolve_weights(f"hf-hub:{REPO_ID}")
    weights_file = res.path / "model.safetensors"
    blob = Path(os.path.realpath(weights_file))
    assert blob.parent.name == "blobs" and blob.name == hashlib.sha256(tiny_files["model.safetensors"]).hexdigest()
    blob.write_bytes(tampered(blob.read_bytes()))  # a damaged disk, or someone with write access to the cache

    hf(hub_server.url, offline=True)  # offline: refused, and the bad blob is gone
    with pytest.raises(weights.TamperedFile, match="the file was deleted and is not used"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    assert not blob.exists() and not weights_file.exists()

    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(tampered(tiny_files["model.safetensors"]))  # poisoned again, and its snapshot link restored
    weights_file.symlink_to(os.path.relpath(blob, weights_file.parent))
    hf(hub_server.url)  # online: the bad copy is replaced by a verified download
    again = weights.resolve_weights(f"hf-hub:{REPO_ID}@{hub_server.sha}")
    assert (again.path / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert home in again.path.parents
    # The same through a branch name: snapshot_download hands back the cached (bad) copy, softcli replaces it.
    blob.write_bytes(tampered(tiny_files["model.safetensors"]))
    seen = len(hub_server.requests)
    assert (weights.resolve_weights(f"hf-hub:{REPO_ID}").path / "model.safetensors").read_bytes() == \
        tiny_files["model.safetensors"]
    assert any("/resolve/" in path and method == "GET" for method, path in hub_server.requests[seen:])


def test_blob_hash_that_is_a_path_never_becomes_a_file_name(hub_server, hf, tmp_path):
    """huggingface_hub names blobs after the ETag header; softcli checks it against the listing first."""
    home = hf(hub_server.url)
    hub_server.linked_etag["model.safetensors"] = "../../../../victim"
    with pytest.raises(weights.WeightsError, match="sent ETag '../../../../victim', not a 40- or 64-hex hash"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    assert files_outside(tmp_path, home / "hub") == [] and not list(tmp_path.rglob("victim"))


def test_file_names_in_the_listing_that_are_paths_write_nothing_outside(hub_server, hf, tmp_path, tiny_files):
    """A guard (huggingface_hub itself refuses these names; this keeps it so across upgrades)."""
    home = hf(hub_server.url)
    hub_server.add_commit(REPO_ID, {**tiny_files, "../../../../evil.safetensors": b"evil",
                                    f"{tmp_path}/abs.safetensors": b"evil"})
    with pytest.raises(weights.WeightsError, match="Invalid filename"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    assert files_outside(tmp_path, home / "hub") == []


def test_a_snapshot_link_out_of_the_cache_is_never_used(hub_server, hf, tmp_path, monkeypatch):
    """The second line of defence, should a huggingface_hub version rename the ETag parser softcli wraps."""
    import contextlib

    home = hf(hub_server.url)
    monkeypatch.setattr("softcli.weights.hf._hex_etags_only", contextlib.nullcontext)
    hub_server.linked_etag["model.safetensors"] = "../../../../victim"
    with pytest.raises(weights.WeightsError, match="model.safetensors pointed outside the cache's blobs folder"):
        weights.resolve_weights(f"hf-hub:{REPO_ID}")
    snapshot = home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / hub_server.sha
    assert not (snapshot / "model.safetensors").is_symlink()


# -- Google Drive: redirects, deadlines, pinned hashes -----------------------------------------------

def test_redirect_off_the_allow_list_is_not_followed(tmp_path):
    with FakeDrive(confirm_above=1 << 20) as drive, FakeDrive(confirm_above=1 << 20) as elsewhere:
        elsewhere.add("w", "w.pth", b"weights from somewhere else")
        drive.add("w", "w.pth", b"real")
        drive.redirect_to = f"{elsewhere.url}/uc?export=download&id=w"  # same machine, another host:port
        with pytest.raises(weights.WeightsError, match="redirected the download of w to http://127.0.0.1:.*not an allowed "
                                                   "host.*refusing to follow it"):
            weights.gdrive_download("w", tmp_path / "w.pth", endpoint=drive.url)
        assert elsewhere.requests == [] and not (tmp_path / "w.pth").exists()
        # A redirect within the allowed host is still followed.
        drive.redirect_to = f"{drive.url}/download?export=download&id=w"
        weights.gdrive_download("w", tmp_path / "w.pth", endpoint=drive.url)
        assert (tmp_path / "w.pth").read_bytes() == b"real"


def test_redirect_from_https_down_to_http_is_not_followed():
    """Checked on the handler itself: the loopback servers speak plain http only."""
    import urllib.request

    from softcli.weights.gdrive import _AllowListRedirects

    handler = _AllowListRedirects({"drive.google.com", "drive.usercontent.google.com"}, "x")
    req = urllib.request.Request("https://drive.google.com/uc?id=x")
    ok = handler.redirect_request(req, None, 302, "Found", {}, "https://drive.usercontent.google.com/download?id=x")
    assert ok is not None and ok.full_url.startswith("https://drive.usercontent.google.com/")
    for target in ("http://drive.usercontent.google.com/download?id=x", "https://evil.example/x", "file:///etc/passwd"):
        with pytest.raises(weights.WeightsError, match="not an allowed host|down to plain http"):
            handler.redirect_request(req, None, 302, "Found", {}, target)


def _download_in_thread(tmp_path: Path, drive: FakeDrive, wait: float) -> tuple[BaseException | None, float]:
    """Run the download in a thread, so that a softcli without a deadline fails this test instead of hanging it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            weights.gdrive_download("slow", tmp_path / "slow.pth", endpoint=drive.url)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(wait)
    assert outcome, f"the download was still running after {wait} s: no total deadline"
    return outcome[0], time.monotonic() - t0


@pytest.mark.parametrize("whole_answer", [False, True], ids=["body", "headers-and-body"])
def test_slow_drip_server_hits_the_total_deadline(tmp_path, monkeypatch, whole_answer):
    monkeypatch.setenv("SOFTCLI_DOWNLOAD_DEADLINE", "1.5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")  # each byte comes well within the per-read timeout
    with FakeDrive(confirm_above=1 << 20) as drive:
        drive.add("slow", "slow.pth", b"x" * 2000)
        drive.drip = (0.2, whole_answer)
        error, seconds = _download_in_thread(tmp_path, drive, wait=12)
    assert isinstance(error, weights.WeightsError), error
    assert "did not finish within 1.5 s (set SOFTCLI_DOWNLOAD_DEADLINE to allow longer)" in str(error)
    assert seconds < 6
    assert not (tmp_path / "slow.pth").exists() and list(tmp_path.iterdir()) == []


def _registry(tmp_path: Path, sha256: str | None) -> str:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    reg = {"models": {"mini": {"architecture": manifest["mini_plain"]["config"], "params": 1, "top1": None,
                               "hub": {"repo_id": "acme/not-published"},
                               "origin": {"kind": "gdrive", "id": "mini-id", "format": "safetensors",
                                          "official_name": "MINI", "sha256": sha256}}}}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(reg))
    return str(path)


@pytest.mark.golden
def test_origin_sha256_is_pinned_once_known(hub_server, hf, tmp_path):
    official = (GOLDEN / "mini_plain.weights.safetensors").read_bytes()
    with FakeDrive() as drive:
        drive.add("mini-id", "MINI.safetensors", official)
        hf(hub_server.url, SOFTCLI_GDRIVE_ENDPOINT=drive.url, SOFTCLI_REGISTRY=_registry(tmp_path, None))
        first = weights.resolve_weights("mini")
        assert first.source == "origin"
        record = json.loads((first.path / "origin.json").read_text())
        assert record["download_sha256"] == hashlib.sha256(official).hexdigest()
        # The file on Drive changes: a forced re-download is refused, the converted copy stays as it was.
        drive.add("mini-id", "MINI.safetensors", tampered(official))
        with pytest.raises(weights.WeightsError, match="its first download .* says "
                                                   f"{record['download_sha256']}; refusing to use it"):
            weights.resolve_weights("mini", force=True)
        assert json.loads((first.path / "origin.json").read_text()) == record
        assert weights.resolve_weights("mini").sha256 == first.sha256


# -- soft weights convert / push write only where asked ------------------------------------------------

@pytest.mark.golden
def test_convert_into_an_unwritable_place_fails_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr("softcli.checkpoint.read_checkpoint", no_work)
    (tmp_path / "file").write_text("x")
    for out in ("/proc/softcli-test/out", tmp_path / "file" / "out"):
        with pytest.raises(OutputError, match="cannot create files in folder /proc|is a file, not a folder"):
            weights.convert_checkpoint(GOLDEN / "mini_plain.weights.safetensors", out)


@pytest.mark.golden
def test_convert_cli_unwritable_out_is_one_error_line(tmp_path):
    r = run_soft("weights", "convert", GOLDEN / "mini_plain.weights.safetensors", "--out", "/proc/softcli-test/x",
                 env=hub_env(tmp_path / "hf", "http://127.0.0.1:9"))
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: /proc/softcli-test/x: cannot create files in folder /proc (No such file or directory)"]


@pytest.mark.golden
def test_convert_writes_only_inside_the_asked_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = weights.convert_checkpoint(GOLDEN / "mini_plain.weights.safetensors", work / "a" / "b", name="../../x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "work", "work/a", "work/a/b", "work/a/b/README.md", "work/a/b/config.json", "work/a/b/model.safetensors"]
    assert out == work / "a" / "b"


@pytest.mark.golden
@pytest.mark.parametrize("branch", ["../../x", "/tmp/x", "main/../../x", "a" * 40])
def test_push_to_a_branch_that_is_not_a_branch_name_is_refused(hub_server, hf, tmp_path, branch):
    folder = weights.convert_checkpoint(GOLDEN / "mini_plain.weights.safetensors", tmp_path / "mini")
    hf(hub_server.url, HF_TOKEN="hf_test_token")
    with pytest.raises(weights.WeightsError, match="not a branch name"):
        weights.push_folder(folder, "acme/pushed", revision=branch)
    assert hub_server.requests == []


def test_every_refusal_here_is_a_soft_error():
    """The CLI turns SoftError into one 'error:' line; the new errors must be ones."""
    assert issubclass(weights.TamperedFile, weights.WeightsError) and issubclass(weights.WeightsError, SoftError)
    assert issubclass(OutputError, SoftError)
