"""Shared fixtures: where the golden reference lives, tiny models, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the internet and never touch the user's Hugging Face cache: unless a
# test points them elsewhere, the Hub and the Drive origin are a closed loopback port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("SOFTCLI_GDRIVE_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _golden_dir() -> Path:
    env = os.environ.get("SOFTCLI_GOLDEN")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "reference" / "golden"


GOLDEN = _golden_dir()
#: The one reason every golden test gives when the reference files are not there (a plain clone).
GOLDEN_MISSING = (f"golden reference files not found at {GOLDEN}: lay shared/reference/golden beside the "
                  "checkout or set SOFTCLI_GOLDEN")


def golden_available() -> bool:
    return (GOLDEN / "manifest.json").is_file()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the golden files, skip (with one reason) every test that uses the ``golden`` fixture or marker."""
    if golden_available():
        return
    skip = pytest.mark.skip(reason=GOLDEN_MISSING)
    for item in items:
        if "golden" in getattr(item, "fixturenames", ()) or item.get_closest_marker("golden") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden() -> Path:
    """The official reference outputs; CI lays shared/ beside the checkout (tests skip without them)."""
    if not golden_available():
        pytest.skip(GOLDEN_MISSING)
    return GOLDEN


@pytest.fixture(scope="session")
def manifest(golden: Path) -> dict:
    return json.loads((golden / "manifest.json").read_text())


#: A SOFT network small enough for fast tests (same code paths as the real ones).
TINY_CONFIG = {
    "embed_dims": [16, 32, 48, 64],
    "num_heads": [1, 2, 3, 2],
    "depths": [1, 1, 1, 1],
    "sr_ratios": [8, 4, 2],
    "num_classes": 10,
}


@pytest.fixture
def tiny_model():
    import torch

    import softcli

    torch.manual_seed(0)
    return softcli.create_model(TINY_CONFIG, num_classes=10)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A softcli folder of a random TINY_CONFIG backbone (no classes), made once per session."""
    import torch

    import softcli

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-backbone") / "tiny"
    softcli.save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=0), folder)
    return folder


def run_soft(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300,
             input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m softcli ARGS`` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("SOFTCLI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "softcli", *map(str, args)], capture_output=True,
                          env=full_env, cwd=cwd, timeout=timeout, input=input)


@pytest.fixture
def soft():
    return run_soft
