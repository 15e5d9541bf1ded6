"""Where weights live and how long network calls may take: read from the environment at each call.

huggingface_hub's own settings (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``) are
used as everywhere else; softcli adds ``SOFTCLI_DOWNLOAD_DEADLINE`` and
``SOFTCLI_GDRIVE_ENDPOINT`` for official-release downloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

DEADLINE_ENV = "SOFTCLI_DOWNLOAD_DEADLINE"

#: ``progress(bytes_done, bytes_total or None)`` for a download.
ProgressFn = Callable[[int, int | None], None]


def env_seconds(name: str, default: float = 10.0) -> float:
    """A positive number of seconds from ``$name``; ``default`` when unset or not a positive number."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def meta_timeout() -> float:
    return env_seconds("HF_HUB_ETAG_TIMEOUT")


def download_timeout() -> float:
    return env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")


def download_deadline() -> float:
    """Seconds a whole official-release download may take (``SOFTCLI_DOWNLOAD_DEADLINE``, default 1800)."""
    return env_seconds(DEADLINE_ENV, 1800.0)


def hf_home() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def origin_cache() -> Path:
    """softcli's own cache of weights converted from official releases."""
    return hf_home() / "softcli" / "origin"
