"""Weights: model specs, the registry, the Hugging Face Hub, official releases, publishing.

Modules: :mod:`.spec` (what a spec names), :mod:`.registry` (named models),
:mod:`.hf` (Hub download + verification), :mod:`.gdrive` and :mod:`.origin`
(official releases), :mod:`.resolve` (spec → local files), :mod:`.publish`
(convert, model card, push), :mod:`.config` (environment). None of them
imports torch at module level.
"""

from __future__ import annotations

from ..errors import (
                      HubAuthError,
                      HubNotCached,
                      HubUnavailable,
                      NotASoftcliFolder,
                      OriginUnavailable,
                      RegistryError,
                      TamperedFile,
                      UnknownModel,
                      UnverifiableFile,
                      WeightsError,
                      WeightsNotCached,
)
from .config import hf_home, hub_cache, hub_endpoint, is_offline, origin_cache
from .gdrive import gdrive_download
from .hf import HUB_PATTERNS, pull_hub
from .origin import convert_origin, fetch_origin
from .publish import (
                      CARD_MARK,
                      convert_checkpoint,
                      model_card,
                      push_folder,
                      write_model_card,
)
from .registry import Registry, RegistryEntry, load_registry
from .resolve import (
                      FITTED_KEYS,
                      checkpoint_summary,
                      is_cached,
                      resolve_registry,
                      resolve_weights,
                      weights_info,
)
from .spec import HF_PREFIX, ResolvedWeights, check_revision, parse_hub_spec, spec_kind

__all__ = [
    "CARD_MARK", "FITTED_KEYS", "HF_PREFIX", "HUB_PATTERNS", "HubAuthError", "HubNotCached", "HubUnavailable",
    "NotASoftcliFolder",
    "OriginUnavailable", "Registry", "RegistryEntry", "RegistryError", "ResolvedWeights", "TamperedFile",
    "UnknownModel", "UnverifiableFile", "WeightsError", "WeightsNotCached", "check_revision", "checkpoint_summary",
    "convert_checkpoint", "convert_origin", "fetch_origin", "gdrive_download", "hf_home", "hub_cache",
    "hub_endpoint", "is_cached", "is_offline", "load_registry", "model_card", "origin_cache", "parse_hub_spec",
    "pull_hub", "push_folder", "resolve_registry", "resolve_weights", "spec_kind", "weights_info",
    "write_model_card",
]
