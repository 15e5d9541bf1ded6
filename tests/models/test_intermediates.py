"""SoftModel.forward_intermediates: timm's index convention, stop_early, and the same numbers as a full run."""

from __future__ import annotations

import pytest
import torch

from softcli.models.soft import stage_take_indices


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))


def test_take_indices_follow_timm():
    assert stage_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert stage_take_indices(4, 2) == ([2, 3], 3)  # an int: the last n
    assert stage_take_indices(4, [2, 0, 0]) == ([0, 2], 2)  # sorted, once each
    assert stage_take_indices(4, [-1, 1]) == ([1, 3], 3)  # negative: from the end
    assert stage_take_indices(4, []) == ([], -1)
    for bad in ([4], [-5], 5, -1):
        with pytest.raises(ValueError):
            stage_take_indices(4, bad)


def test_all_intermediates_equal_forward_features_and_forward(tiny_model, image):
    with torch.inference_mode():
        cls, maps = tiny_model.forward_intermediates(image)
        features = tiny_model.forward_features(image)
        logits = tiny_model(image)
        head = tiny_model.forward_head(cls)
        token = tiny_model.forward_class_token(image)
    assert len(maps) == 4
    assert all(torch.equal(a, b) for a, b in zip(maps, features))
    assert torch.equal(head, logits)
    assert torch.equal(token, cls)
    strides = [image.shape[-1] // m.shape[-1] for m in maps]
    assert strides == [4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == list(tiny_model.config.embed_dims)


@pytest.mark.parametrize("indices", [[0], [1], [0, 2], [3], [1, 3]])
def test_chosen_stages_are_the_full_runs_maps(tiny_model, image, indices):
    with torch.inference_mode():
        full = tiny_model.forward_features(image)
        some = tiny_model.forward_intermediates(image, indices, intermediates_only=True)
    assert len(some) == len(indices)
    assert all(torch.equal(m, full[i]) for m, i in zip(some, indices))


def _count_stage_calls(model):
    calls = [0] * len(model.stages)
    hooks = [stage.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, stage in enumerate(model.stages)]
    return calls, hooks


@pytest.mark.parametrize("stop_early,intermediates_only,expected", [
    (True, True, [1, 1, 0, 0]),  # stops after stage 2, the deepest asked for
    (False, True, [1, 1, 1, 1]),
    (True, False, [1, 1, 1, 1]),  # the class token needs stage 4
])
def test_stop_early_skips_later_stages(tiny_model, image, stop_early, intermediates_only, expected):
    calls, hooks = _count_stage_calls(tiny_model)
    try:
        with torch.inference_mode():
            out = tiny_model.forward_intermediates(image, [1], stop_early=stop_early,
                                                   intermediates_only=intermediates_only)
    finally:
        for h in hooks:
            h.remove()
    assert calls == expected
    maps = out if intermediates_only else out[1]
    assert [m.shape[1] for m in maps] == [tiny_model.config.embed_dims[1]]


def test_stage_maps_fn_gives_the_outputs_maps_in_their_order(tiny_model, image):
    from softcli.engine import OutputSpec
    from softcli.features import stage_maps_fn, stage_outputs

    outputs = stage_outputs(tiny_model.config, [3, 1])
    assert [(o.name, o.stride, o.stage) for o in outputs] == [("stage3", 16, 3), ("stage1", 4, 1)]
    with torch.inference_mode():
        got = stage_maps_fn(tiny_model, outputs)(image)
        full = tiny_model.forward_features(image)
    assert torch.equal(got[0], full[2]) and torch.equal(got[1], full[0])
    with pytest.raises(ValueError, match="not all outputs are stage maps"):
        stage_maps_fn(tiny_model, [OutputSpec("scores", 4, 4)])
