"""softcli.profile: the measured module is the model's own, FLOP formulas match counted FLOPs,
out-of-memory and timeouts are recorded per configuration and the sweep goes on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import softcli
from softcli.errors import UsageError
from softcli.models import LandmarkPolicy, SoftAttention
from softcli.profile import (
    DEFAULT_THREADS,
    MIN_REPEATS,
    OfficialOrderAttention,
    STATUSES,
    ProfileJob,
    ProfileSettings,
    attention_jobs,
    build_attention,
    estimate_flops,
    grid_for,
    harness,
    measure,
    model_jobs,
    run_sweep,
    stage_input_sizes,
)
from softcli.profile.harness import _timed_calls
from softcli.profile.settings import RESULT_TAG
from softcli.profile.sweep import _worker_env
from tests.conftest import TINY_CONFIG

# One thread: on a shared machine, OpenMP threads that wait for each other slow small ops 10x.
FAST = dict(repeat=2, warmup=1, isolate=False, threads=1)
REQUIRED = {"method", "tokens", "latency_ms", "tokens_per_s", "peak_mem_bytes", "status"}


def test_grid_is_most_square_factorisation():
    assert grid_for(16384) == (128, 128)
    assert grid_for(65536) == (256, 256)
    assert grid_for(20000) == (125, 160)
    assert grid_for(13) == (1, 13)


def test_narrow_grid_and_unknown_method_are_usage_errors():
    s = ProfileSettings()
    with pytest.raises(UsageError, match="narrower than sr_ratio"):
        attention_jobs(["soft"], [7 * 31], s)
    attention_jobs(["softmax"], [7 * 31], s)  # softmax needs no grid
    with pytest.raises(UsageError, match="unknown method"):
        attention_jobs(["flash"], [1024], s)
    with pytest.raises(UsageError, match="divisible"):
        ProfileSettings(dim=64, heads=3)


def test_soft_is_the_models_attention_at_the_default_policy():
    mod = build_attention("soft", ProfileSettings())
    assert type(mod) is SoftAttention
    assert mod.landmark_policy == LandmarkPolicy()
    off = build_attention("soft-official", ProfileSettings())
    assert type(off) is OfficialOrderAttention and isinstance(off, SoftAttention)
    assert off.landmark_policy.mode == "official"


def test_soft_measures_the_forward_the_model_runs(monkeypatch):
    """The profiled call goes through SoftAttention.forward, the code a SoftBlock runs."""
    calls = []
    real = SoftAttention.forward

    def spy(self, x, hw):
        calls.append((tuple(x.shape), hw))
        return real(self, x, hw)

    monkeypatch.setattr(SoftAttention, "forward", spy)
    res = measure(ProfileJob("soft", (32, 32)), ProfileSettings(**FAST))
    assert res.status == "ok"
    assert calls.count(((1, 1024, 64), (32, 32))) == 1 + 2  # one warm-up, two timed


def test_soft_module_equals_a_model_blocks_attention():
    """Settings that mirror stage 1 build a module computing exactly what the model's block computes."""
    torch.manual_seed(0)
    model = softcli.create_model(TINY_CONFIG, num_classes=10)
    block_attn = model.stages[0].blocks[0].attn
    settings = ProfileSettings(dim=TINY_CONFIG["embed_dims"][0], heads=TINY_CONFIG["num_heads"][0],
                               sr_ratio=TINY_CONFIG["sr_ratios"][0])
    mod = build_attention("soft", settings)
    mod.load_state_dict(block_attn.state_dict())
    x = torch.randn(2, 24 * 32, settings.dim)
    with torch.inference_mode():
        assert torch.equal(mod(x, (24, 32)), block_attn(x, (24, 32)))


def _counted_flops(method, grid, settings):
    mod = build_attention(method, settings).requires_grad_(False)
    x = torch.randn(settings.batch, grid[0] * grid[1], settings.dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        mod(x, grid)
    return counter.get_total_flops()


@pytest.mark.parametrize("method,grid,settings", [
    ("soft", (32, 32), ProfileSettings()),
    ("soft", (128, 128), ProfileSettings(heads=4, landmarks="256")),  # K1 chunked: evaluated twice
    ("soft", (64, 96), ProfileSettings(landmarks="12", batch=2)),  # pooled landmarks
    ("soft-official", (64, 64), ProfileSettings()),
    ("softmax-math", (32, 32), ProfileSettings(batch=2)),
    ("nystromformer", (32, 32), ProfileSettings()),
])
def test_flop_formulas_match_counted_flops(method, grid, settings):
    assert estimate_flops(method, grid, settings) == pytest.approx(_counted_flops(method, grid, settings), rel=1e-6)


def test_softmax_flops_grow_quadratically_and_soft_linearly():
    s = ProfileSettings()
    assert estimate_flops("softmax", (256, 256), s) / estimate_flops("softmax", (128, 128), s) > 15
    # linear in N at a fixed chunk plan; the one step from K1 whole to K1 chunked (evaluated twice) adds < 25 %
    assert estimate_flops("soft", (512, 512), s) / estimate_flops("soft", (256, 256), s) < 4.01
    assert estimate_flops("soft", (256, 256), s) / estimate_flops("soft", (128, 128), s) < 5


def test_in_process_sweep_schema():
    s = ProfileSettings(**FAST)
    report = run_sweep(attention_jobs(["soft", "softmax", "nystromformer"], [256, 1024], s), s)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["device"] == "cpu"
    assert [(r["method"], r["tokens"]) for r in doc["results"]] == [
        ("soft", 256), ("softmax", 256), ("nystromformer", 256), ("soft", 1024), ("softmax", 1024),
        ("nystromformer", 1024)]
    for r in doc["results"]:
        assert REQUIRED <= set(r)
        assert r["status"] in STATUSES and r["status"] == "ok" and r["repeats"] == 2
        assert r["latency_min_ms"] <= r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"] <= r["latency_max_ms"]
        assert r["threads"] == 1 and r["warmup_calls"] == 1
        assert 0 < r["cpu_min_ms"] <= r["cpu_ms"] <= r["cpu_max_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["latency_ms"] / 1e3))
        assert r["peak_mem_bytes"] is None  # in-process CPU runs cannot isolate a peak


def test_isolated_worker_timeout_is_recorded():
    s = ProfileSettings(repeat=1, warmup=0, timeout_s=0.1)  # less than starting Python and importing torch
    (res,) = run_sweep([ProfileJob("softmax", (16, 16))], s).results
    assert res.status == "timeout" and res.latency_ms is None and "0.1 s" in res.message
    assert res.flops is not None


def test_max_memory_needs_isolated_cpu_workers():
    s = ProfileSettings(isolate=False, max_memory_bytes=10**9)
    with pytest.raises(UsageError, match="max_memory"):
        run_sweep([ProfileJob("soft", (16, 16))], s)


def test_model_jobs_cover_every_stage():
    jobs = model_jobs("soft_tiny", 4096)
    assert [j.part for j in jobs] == ["stage1", "stage2", "stage3", "stage4", "model"]
    assert [j.tokens for j in jobs] == [1024**2, 512**2, 256**2, 128**2, 1024**2]
    with pytest.raises(UsageError, match="unknown model"):
        model_jobs("soft_gigantic", 256)


@pytest.mark.parametrize("size", [100, 97])
def test_stage_grids_match_the_models_feature_maps(tiny_model, size):
    """Each stage job's token grid is the map that stage really produces (odd sizes round up)."""
    with torch.inference_mode():
        maps = tiny_model.forward_features(torch.randn(1, 3, size, size))
    assert [j.grid for j in model_jobs("soft_tiny", size)[:4]] == [tuple(m.shape[-2:]) for m in maps]
    assert stage_input_sizes(size)[1:] == [maps[i].shape[-1] for i in range(3)]


def test_model_mode_measures_stages_and_the_whole_model_in_process():
    s = ProfileSettings(repeat=1, warmup=1, isolate=False, threads=1)
    jobs = model_jobs("soft_tiny", 64)
    report = run_sweep([jobs[0], jobs[3], jobs[4]], s)  # stage 1, stage 4 (class token), whole model
    assert [(r.part, r.status) for r in report.results] == [("stage1", "ok"), ("stage4", "ok"), ("model", "ok")]
    for r in report.results:
        # Counting FLOPs is an extra call, not the warm-up: stages and model get the same harness.
        assert (r.warmup_calls, r.repeats, r.threads) == (1, 1, 1)
        assert r.flops > 0 and r.megapixels_per_s == pytest.approx(64 * 64 / 1e6 / (r.latency_ms / 1e3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_measurement_and_oom():
    s = ProfileSettings(device="cuda", repeat=2, warmup=1, isolate=False)
    ok = measure(ProfileJob("soft", (64, 64)), s)
    assert ok.status == "ok" and ok.peak_mem_bytes >= ok.base_mem_bytes > 0
    # softmax-math at 2^20 tokens materialises a 4 TiB matrix: every GPU refuses it.
    oom = measure(ProfileJob("softmax-math", (1024, 1024)), s)
    assert oom.status == "oom" and oom.latency_ms is None


def test_every_configuration_runs_at_the_fixed_thread_count(monkeypatch):
    """The calls run with settings.threads torch threads (default 1), and the caller's count comes back."""
    seen = []
    real = SoftAttention.forward

    def spy(self, x, hw):
        seen.append(torch.get_num_threads())
        return real(self, x, hw)

    monkeypatch.setattr(SoftAttention, "forward", spy)
    assert ProfileSettings().threads == DEFAULT_THREADS == 1
    before = torch.get_num_threads()
    res = measure(ProfileJob("soft", (32, 32)), ProfileSettings(**{**FAST, "threads": 2}))
    assert seen == [2] * 4 and res.threads == 2  # priming call, one warm-up, two timed
    assert torch.get_num_threads() == before
    with pytest.raises(UsageError, match="threads must be at least 1"):
        ProfileSettings(threads=0)


class _Calls:
    """A stand-in measured call that only counts how often it ran."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_time_budget_still_leaves_several_repeats():
    call = _Calls()
    warm, times, _ = _timed_calls(call, ProfileSettings(repeat=10, warmup=2, time_budget_s=1e-9), torch.device("cpu"))
    assert (warm, len(times), call.count) == (2, MIN_REPEATS, 2 + MIN_REPEATS)
    call = _Calls()
    warm, times, _ = _timed_calls(call, ProfileSettings(repeat=2, warmup=0, time_budget_s=1e-9), torch.device("cpu"))
    assert (warm, len(times), call.count) == (0, 2, 2)  # fewer only when asked for fewer
    call = _Calls()
    warm, times, _ = _timed_calls(call, ProfileSettings(repeat=7, warmup=1, time_budget_s=1e9), torch.device("cpu"))
    assert (warm, len(times), call.count) == (1, 7, 8)


def test_a_long_warm_up_call_ends_warm_up(monkeypatch):
    monkeypatch.setattr(harness, "LONG_CALL_S", -1.0)  # every call counts as long
    call = _Calls()
    warm, times, _ = _timed_calls(call, ProfileSettings(repeat=3, warmup=5), torch.device("cpu"))
    assert (warm, len(times), call.count) == (1, 3, 4)


def test_worker_is_a_runnable_module():
    """``python -m softcli.profile.worker`` measures one job and prints one tagged JSON result."""
    spec = json.dumps({"job": {"method": "softmax", "grid": [16, 16]},
                       "settings": {**FAST, "repeat": 1, "warmup": 0}})
    proc = subprocess.run([sys.executable, "-m", "softcli.profile.worker", spec], check=False, capture_output=True,
                          timeout=300, env=_worker_env(ProfileSettings()))
    assert proc.returncode == 0, proc.stderr.decode()
    (line,) = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith(RESULT_TAG)]
    res = json.loads(line[len(RESULT_TAG):])
    assert res["status"] == "ok" and res["tokens"] == 256 and res["threads"] == 1
