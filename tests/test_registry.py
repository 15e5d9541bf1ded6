"""The registry of named models: the shipped data is complete and consistent; bad files fail clearly."""

from __future__ import annotations

import json
import re

import pytest

from softcli.models import SoftConfig
from softcli.errors import RegistryError, UnknownModel
from softcli.weights.registry import load_registry, parse_registry
from tests.conftest import GOLDEN, REPO

OFFICIAL = {  # official release name → (registry name, variant, paper top-1), per shared/reference/SOFT.md
    "SOFT_Tiny": ("soft_tiny", "soft_tiny", 79.3),
    "SOFT_Tiny_cuda": ("soft_tiny_cuda", "soft_tiny", None),
    "SOFT_Tiny_norm": ("soft_norm_tiny", "soft_norm_tiny", 79.4),
    "SOFT_Small_norm": ("soft_norm_small", "soft_norm_small", 82.4),
    "SOFT_Medium_norm": ("soft_norm_medium", "soft_norm_medium", 83.1),
    "SOFT_Large_norm": ("soft_norm_large", "soft_norm_large", 83.3),
}


@pytest.fixture(autouse=True)
def builtin_registry(monkeypatch):
    monkeypatch.delenv("SOFTCLI_REGISTRY", raising=False)


def test_one_entry_per_official_release():
    reg = load_registry()
    assert reg.default == "soft_tiny"
    assert {e.origin.official_name for e in reg.entries.values()} == set(OFFICIAL)
    for official, (name, variant, top1) in OFFICIAL.items():
        e = reg.get(name)
        assert e.origin.official_name == official and e.architecture == {"variant": variant}
        assert e.top1 == top1
        assert e.hub.repo_id == "softcli/" + name.replace("_", "-") and e.hub.filename == "model.safetensors"
        assert e.origin.kind == "gdrive" and e.origin.format == "pth"
        # Drive ids as linked from the official README; sha256 not recorded yet, and the note says so.
        assert isinstance(e.origin.id, str) and len(e.origin.id) == 33 and e.origin.sha256 is None
        assert "fudan-zvg/SOFT" in e.origin.note
        SoftConfig.from_dict(e.architecture)  # a real variant


@pytest.mark.golden
def test_param_counts_match_the_official_architectures():
    keys = json.loads((GOLDEN / "official_state_dict_keys.json").read_text())
    for e in load_registry().entries.values():
        assert e.params == keys[e.architecture["variant"]]["params"], e.name


def test_weights_folder_links_the_packaged_registry():
    link = REPO / "weights" / "registry.json"
    assert link.resolve() == (REPO / "softcli" / "data" / "registry.json").resolve()
    readme = (REPO / "weights" / "README.md").read_text()
    assert "soft weights convert" in readme and "soft weights push" in readme


def test_unknown_name_suggests_the_closest_or_lists_the_known_ones():
    with pytest.raises(UnknownModel, match=r"unknown model 'soft_tiyn': not a registry name; did you mean soft_tiny(,| or|\?)"
                       ) as typo:
        load_registry().get("soft_tiyn")
    assert typo.value.suggestions[0] == "soft_tiny" and isinstance(typo.value, RegistryError)
    with pytest.raises(UnknownModel, match=r"unknown model 'resnet50': not a registry name; known: soft_tiny, ") as far:
        load_registry().get("resnet50")
    assert far.value.suggestions == [] and "--" not in str(far.value)  # the library names no CLI flag


@pytest.mark.parametrize("text, message", [
    ("{", "invalid JSON"),
    ('{"models": {}}', "non-empty 'models'"),
    ('{"models": {"a": {"architecture": {}, "params": 1, "hub": {"repo_id": "norepo"}}}}', "ORG/NAME"),
    ('{"models": {"a": {"architecture": {}, "params": 1, "hub": {"repo_id": "o/a"}, '
     '"origin": {"kind": "ftp", "format": "pth"}}}}', "origin kind"),
    ('{"default": "b", "models": {"a": {"architecture": {}, "params": 1, "hub": {"repo_id": "o/a"}}}}',
     "default 'b'"),
    ('{"models": {"a": {"params": 1, "hub": {"repo_id": "o/a"}}}}', "entry 'a'"),
])
def test_bad_registry_files_fail_clearly(text, message):
    with pytest.raises(RegistryError, match=re.escape(message)):
        parse_registry(text, "my.json")


def test_registry_env_override(tmp_path, monkeypatch):
    path = tmp_path / "zoo.json"
    path.write_text('{"models": {"mine": {"architecture": {"variant": "soft_tiny"}, "params": 1, '
                    '"hub": {"repo_id": "me/mine", "revision": "v2"}}}}')
    monkeypatch.setenv("SOFTCLI_REGISTRY", str(path))
    reg = load_registry()
    assert reg.default == "mine" and reg.get("mine").hub.revision == "v2" and reg.get("mine").origin is None
    monkeypatch.setenv("SOFTCLI_REGISTRY", str(tmp_path / "missing.json"))
    with pytest.raises(RegistryError, match="cannot read registry"):
        load_registry()
