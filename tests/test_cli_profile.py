"""``soft profile`` as a user runs it: JSON schema, table, CSV, plot, OOM and usage errors."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from softcli.cli.app import main
from softcli.profile import STATUSES

REQUIRED = {"method", "tokens", "latency_ms", "tokens_per_s", "peak_mem_bytes", "status"}


def _doc(proc) -> dict:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def test_json_schema_with_isolated_workers(soft):
    proc = soft("profile", "--tokens", "1024", "--methods", "soft,softmax", "--device", "cpu",
                "--threads", "1", "--repeat", "1", "--warmup", "0", "--json")
    doc = _doc(proc)
    assert doc["device"] == "cpu" and doc["threads"] == 1
    assert len(doc["loadavg"]) == len(doc["loadavg_end"]) == 3
    assert [(r["method"], r["tokens"]) for r in doc["results"]] == [("soft", 1024), ("softmax", 1024)]
    for r in doc["results"]:
        assert REQUIRED <= set(r) and r["status"] in STATUSES
        assert r["status"] == "ok" and r["latency_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["threads"] == 1 and r["repeats"] == 1  # measured in the worker, not assumed
        assert r["peak_mem_bytes"] >= r["base_mem_bytes"] > 0  # each worker's own peak RSS
    assert doc["results"][0]["landmarks"] >= 1 and doc["results"][1]["landmarks"] is None


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS memory limits are Linux-only")
def test_out_of_memory_is_a_result_and_the_sweep_goes_on(soft):
    """64 MB cannot hold softmax-math's 4096² matrix (128 MB): that worker reports oom, the next runs."""
    proc = soft("profile", "--tokens", "4096", "--methods", "softmax-math,soft", "--device", "cpu",
                "--threads", "1", "--repeat", "1", "--warmup", "0", "--max-memory", "64MB", "--json")
    oom, ok = _doc(proc)["results"]
    assert oom["method"] == "softmax-math" and oom["status"] == "oom" and "allocate" in oom["message"]
    assert oom["latency_ms"] is None and oom["tokens_per_s"] is None
    assert ok["method"] == "soft" and ok["status"] == "ok" and ok["latency_ms"] > 0
    assert ok["extra_mem_bytes"] < 64 * 10**6 and oom["peak_mem_bytes"] >= oom["base_mem_bytes"] > 0


def test_table_and_csv(soft, tmp_path):
    out = tmp_path / "p.csv"
    proc = soft("profile", "--tokens", "256", "--device", "cpu", "--threads", "1", "--repeat", "1", "--warmup", "0",
                "--in-process", "--csv", out)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    for method in ("soft", "soft-official", "softmax", "nystromformer"):
        assert method in text
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["soft", "soft-official", "softmax", "nystromformer"]
    assert all(r["status"] == "ok" and float(r["latency_ms"]) > 0 and r["grid"] == "16x16" for r in rows)
    assert not list(tmp_path.glob(".*partial*"))


def test_model_mode_json(soft):
    doc = _doc(soft("profile", "--model", "soft_tiny", "--image-size", "64", "--device", "cpu", "--threads", "1", "--repeat", "1",
                    "--warmup", "1", "--in-process", "--json"))
    assert [r["part"] for r in doc["results"]] == ["stage1", "stage2", "stage3", "stage4", "model"]
    assert [r["tokens"] for r in doc["results"]] == [256, 64, 16, 4, 256]
    assert all(r["status"] == "ok" and r["megapixels_per_s"] > 0 for r in doc["results"])


def test_plot(soft, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    proc = soft("profile", "--tokens", "256,1024", "--methods", "soft,softmax", "--device", "cpu",
                "--threads", "1", "--repeat", "1", "--warmup", "0", "--in-process", "--plot", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--tokens", "12,abc"], "--tokens takes"),
    (["--methods", "soft,flash"], "unknown method 'flash'"),
    (["--tokens", "217"], "narrower than --sr-ratio"),
    (["--model", "soft_tiny", "--tokens", "1024"], "does not take --tokens"),
    (["--model", "soft_gigantic"], "unknown model"),
    (["--dtype", "fp8"], "--dtype takes"),
    (["--max-memory", "lots"], "--max-memory: cannot read 'lots' as a size"),
    (["--device", "cpu", "--in-process", "--max-memory", "1GB"], "--max-memory works"),
])
def test_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:  # in process: these fail before any measuring
        main(["profile", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert out == ""


def test_output_folder_must_exist(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--device", "cpu", "--csv", str(tmp_path / "missing" / "p.csv")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error:") and "does not exist" in err


def test_a_failing_configuration_is_reported_and_exits_1(capsys, monkeypatch):
    """Not out of memory, not out of time: recorded as error, the rest still measured, exit 1."""
    from softcli.models import SoftAttention

    def broken(self, x, hw):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(SoftAttention, "forward", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--device", "cpu", "--tokens", "256", "--methods", "soft,softmax", "--in-process",
              "--threads", "1", "--repeat", "1", "--warmup", "0", "--json"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    soft_row, softmax_row = json.loads(out)["results"]
    assert soft_row["status"] == "error" and "broken on purpose" in soft_row["message"]
    assert softmax_row["status"] == "ok"
    assert err.startswith("error: 1 configuration(s) failed: soft 256: ValueError: broken on purpose")


def test_model_mode_table_says_how_stages_add_up(capsys):
    """Default threads (1) are stated, and the stages' sum is set against the whole model."""
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "soft_tiny", "--image-size", "64", "--device", "cpu", "--repeats", "1",
              "--warmup", "0", "--in-process"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    out = " ".join(captured.out.split())
    assert "1 thread," in out and "1 CPU thread throughout" in out
    assert "median ms of stages 1-4 add up to" in out and "CPU ms of stages 1-4 add up to" in out
