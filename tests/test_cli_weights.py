"""``soft weights ...`` as a user runs it: outputs, JSON, errors, help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import softcli
from softcli.checkpoint import save_pretrained
from softcli.cli.app import main
from tests.conftest import GOLDEN, TINY_CONFIG, run_soft
from tests.hub_server import FakeHub, hf, hub_env, no_internet  # noqa: F401 (fixtures)


def soft_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI entry point in this process (fast); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


@pytest.fixture(scope="module")
def mini_hub(tmp_path_factory):
    torch.manual_seed(0)
    folder = save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=10),
                             tmp_path_factory.mktemp("m") / "mini")
    with FakeHub() as server:
        server.sha = server.add_commit("acme/soft-mini", {p.name: p.read_bytes() for p in folder.iterdir()})
        yield server


def test_every_weights_command_has_help_with_an_example(capsys):
    for cmd in ("list", "pull", "info", "convert", "push"):
        code, out, _ = soft_in_process(capsys, "weights", cmd, "--help")
        assert code == 0 and "Example: soft weights" in out, cmd


def test_list_json_in_a_real_process(tmp_path):
    r = run_soft("weights", "list", "--json", env=hub_env(tmp_path / "hf", "http://127.0.0.1:9"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows][:3] == ["soft_tiny", "soft_tiny_cuda", "soft_norm_tiny"]
    assert rows[0] == {"name": "soft_tiny", "params": 13069056, "top1": 79.3, "cached": False, "default": True,
                       "hub": "softcli/soft-tiny@main", "origin": "SOFT_Tiny"}


def test_list_table(capsys, hf):
    hf("http://127.0.0.1:9")
    code, out, _ = soft_in_process(capsys, "weights", "list")
    assert code == 0 and "soft_norm_large" in out and "83.3%" in out and "13.1M" in out


def test_pull_json_then_info_and_list_show_it_cached(capsys, hf, mini_hub, tmp_path):
    home = hf(mini_hub.url)
    code, out, err = soft_in_process(capsys, "weights", "pull", "hf-hub:acme/soft-mini", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["commit"] == mini_hub.sha and res["source"] == "hub" and res["revision"] == "main"
    assert res["path"] == str(home / "hub/models--acme--soft-mini/snapshots" / mini_hub.sha)

    hf(mini_hub.url, offline=True)
    code, out, err = soft_in_process(capsys, "weights", "info", "hf-hub:acme/soft-mini", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["cached"] and info["checkpoint"]["format"] == "softcli"
    assert info["checkpoint"]["architecture"]["embed_dims"] == TINY_CONFIG["embed_dims"]
    assert len(info["checkpoint"]["sha256"]) == 64

    code, out, err = soft_in_process(capsys, "weights", "pull", "hf-hub:acme/soft-mini")
    assert code == 0 and out.strip() == res["path"] and f"commit {mini_hub.sha}" in err


def test_info_of_an_uncached_registry_model(capsys, hf):
    hf("http://127.0.0.1:9", offline=True)
    code, out, _ = soft_in_process(capsys, "weights", "info", "soft_norm_small", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "registry" and not info["cached"]
    assert info["registry"]["top1"] == 82.4 and info["registry"]["origin"]["official_name"] == "SOFT_Small_norm"


@pytest.mark.golden
def test_push_cli_json(capsys, tmp_path, hf, mini_hub):
    hf(mini_hub.url, HF_TOKEN="hf_test")
    hub_folder = tmp_path / "hf/hub"
    code, out, err = soft_in_process(capsys, "weights", "convert", GOLDEN / "mini_plain.weights.safetensors",
                                     "--out", tmp_path / "mini")
    assert code == 0, err
    code, out, err = soft_in_process(capsys, "weights", "push", tmp_path / "mini", "--repo", "acme/cli-pushed",
                                     "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["spec"] == f"hf-hub:acme/cli-pushed@{res['commit']}" and not res["private"]
    assert set(mini_hub.repos["acme/cli-pushed"].commits[res["commit"]]) == {"model.safetensors", "config.json",
                                                                            "README.md"}
    assert not hub_folder.exists()  # pushing does not fill the download cache


@pytest.mark.golden
def test_convert_cli_and_error_lines(capsys, tmp_path, hf):
    hf("http://127.0.0.1:9")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    code, out, err = soft_in_process(capsys, "weights", "convert", GOLDEN / "mini_plain.weights.safetensors",
                                     "--out", tmp_path / "mini", "--labels", labels, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["format"] == "softcli" and res["labels"] == 10 and res["params"] == 822878
    assert json.loads((tmp_path / "mini" / "config.json").read_text())["labels"][9] == "thing 9"

    code, _, err = soft_in_process(capsys, "weights", "convert", tmp_path / "nope.pth", "--out", tmp_path / "x")
    assert code == 1 and err.startswith("error: ") and "no such file" in err and len(err.splitlines()) == 1
    code, _, err = soft_in_process(capsys, "weights", "convert", GOLDEN / "mini_plain.weights.safetensors",
                                   "--out", tmp_path / "y", "--model", "soft_tiny")
    assert code == 1 and "does not fit soft_tiny" in err
    hf("http://127.0.0.1:9", HF_TOKEN="hf_test")
    code, out, err = soft_in_process(capsys, "weights", "push", tmp_path / "mini", "--repo", "acme/x")
    assert code == 1 and "pushing to hf-hub:acme/x on http://127.0.0.1:9 failed: connection refused" in err
    code, _, err = soft_in_process(capsys, "weights", "push", tmp_path / "nothing", "--repo", "a/b")
    assert code == 1 and "not a softcli folder" in err
    code, _, err = soft_in_process(capsys, "weights", "pull", "hf-hub:bad")
    assert code == 1 and "not a Hub model spec" in err


# -- issue 16: tables that fit, did-you-mean, --debug shows the real cause ---------------------------------

LONG_NAME = "soft_norm_large_finetuned_on_camelyon16_and_panda_at_20x_v2"
LONG_REPO = "some-organisation-with-a-long-name/soft-norm-large-finetuned-on-pathology-v2"


def _column(table: str, header: str, next_header: str) -> str:
    """The text of one column of a plain table (from its header to the next one's), wrapped pieces joined."""
    lines = table.splitlines()
    start, end = lines[0].index(header), lines[0].index(next_header)
    return "".join(line[start:end].strip() for line in lines[1:])


def test_list_piped_fits_80_columns_and_wraps_instead_of_truncating(capsys, hf, tmp_path):
    registry = json.loads((Path(softcli.__file__).parent / "data" / "registry.json").read_text())
    registry["models"][LONG_NAME] = {**registry["models"]["soft_tiny"], "hub": {"repo_id": LONG_REPO}}
    (tmp_path / "reg.json").write_text(json.dumps(registry))
    hf("http://127.0.0.1:9", SOFTCLI_REGISTRY=str(tmp_path / "reg.json"))
    code, out, _ = soft_in_process(capsys, "weights", "list")  # stdout is captured: not a terminal
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out and "\x1b" not in out, out  # never truncated; no colour or control codes
    assert LONG_NAME in _column(out, "name", "params"), out  # every character is there, wrapped
    assert LONG_REPO + "@main" in _column(out, "hub repo", "official release"), out
    code, out, _ = soft_in_process(capsys, "weights", "list", "--json")  # --json is unchanged by the table width
    assert LONG_NAME in [row["name"] for row in json.loads(out)]


def test_unknown_model_suggests_close_names(capsys, hf, tmp_path):
    hf("http://127.0.0.1:9")
    code, _, err = soft_in_process(capsys, "weights", "info", "soft_norm_tiyn")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "unknown model 'soft_norm_tiyn'" in err and "did you mean soft_norm_tiny" in err
    assert err.rstrip().endswith("? See 'soft weights list'")  # the CLI's next step, added by the CLI layer
    (tmp_path / "x.png").write_bytes(b"")
    code, _, err = soft_in_process(capsys, "classify", tmp_path / "x.png", "--model", "sof_tiny")
    assert code == 1 and "did you mean soft_tiny" in err, err


def test_debug_shows_the_chained_cause(tmp_path):
    """--debug prints the traceback with the real network error as the cause, not just softcli's one line."""
    from tests.hub_server import free_port_closed

    env = hub_env(tmp_path / "hf", f"http://127.0.0.1:{free_port_closed()}")
    plain = run_soft("weights", "pull", "hf-hub:acme/soft-mini", env=env)
    err = plain.stderr.decode()
    assert plain.returncode == 1 and "Traceback" not in err and "connection refused" in err
    debug = run_soft("--debug", "weights", "pull", "hf-hub:acme/soft-mini", env=env)
    err = debug.stderr.decode()
    assert debug.returncode == 1 and "Traceback" in err
    assert "The above exception was the direct cause of the following exception" in err, err
    assert "ConnectError: [Errno 111] Connection refused" in err and "HubNotCached" in err, err
