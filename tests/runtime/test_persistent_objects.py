"""The persistent-objects map, walked once per envoy-tree state: always equal to nnsight's own.

Every test changes the model one way the tree can change (an edit through the envoy, an `_update`
as a PEFT swap or reload does, an envoy nnsight wraps lazily, a replaced container, path or
class, a planted child) and checks the map against a fresh `_remoteable_persistent_objects()`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model_runtime.replica import persistent_objects as po
from model_runtime.replica.levels import move_module


@pytest.fixture
def model(tiny_llama: Path) -> Any:
    """A model of the test's own: the tests edit it."""
    from nnsight import TransformersModel

    return TransformersModel(str(tiny_llama), task="text-generation", dispatch=True, device_map="cpu")


def _same(cached: dict[str, Any], fresh: dict[str, Any]) -> None:
    assert list(cached) == list(fresh)
    assert all(cached[key] is fresh[key] for key in fresh)


def _check(model: Any) -> dict[str, Any]:
    cached = po.persistent_objects(model)
    _same(cached, model._remoteable_persistent_objects())
    return cached


def test_walked_once_while_the_tree_is_unchanged(model: Any) -> None:
    cache = po.cache_for(model)
    first = _check(model)
    for _ in range(3):
        again = _check(model)
        assert again is not first  # a new dict each time
    assert cache.walks == 1
    assert "Interleaver" in first and "Tokenizer" in first and "Module:model.lm_head" in first


def _edit_through_envoy(model: Any) -> None:
    model.model.layers[0].extra = torch.nn.Linear(2, 2)  # Envoy.__setattr__ adds the module and an envoy


def _update_after_module_swap(model: Any) -> None:
    # What a PEFT swap or reload does: the torch tree changes, then `_update` re-points the envoys.
    model._module.model.layers[0].mlp.down_proj = torch.nn.Linear(2, 2)
    model._update(model._module)


def _lazily_wrapped(model: Any) -> None:
    # A module held outside `_modules`: nnsight wraps it on first attribute access (a new child).
    vars(model._module.lm_head)["side"] = torch.nn.Linear(2, 2)
    model.lm_head.side  # noqa: B018


def _replaced_container(model: Any) -> None:
    envoy = model.model.layers[1]
    envoy._children = list(envoy._children)


def _planted_child(model: Any) -> None:
    from nnsight.intervention.envoy import Envoy

    model.model._child_map["planted"] = Envoy(torch.nn.Linear(2, 2), path="model.planted")


def _renamed(model: Any) -> None:
    model.model.norm.path = "model.elsewhere"


def _reclassed(model: Any) -> None:
    from nnsight.intervention.envoy import Envoy

    class Other(Envoy):  # type: ignore[misc]
        pass

    model.model.norm.__class__ = Other


def _module_replaced(model: Any) -> None:
    model.model.norm._module = torch.nn.LayerNorm(2)


def _tokenizer_replaced(model: Any) -> None:
    model.tokenizer = None


def _level_moved(model: Any) -> None:
    move_module(model, "meta")  # the same modules, new storage: the map is unchanged


@pytest.mark.parametrize("change", [
    _edit_through_envoy, _update_after_module_swap, _lazily_wrapped, _replaced_container, _planted_child,
    _renamed, _reclassed, _module_replaced, _tokenizer_replaced, _level_moved,
], ids=lambda f: f.__name__.strip("_"))
def test_any_change_gives_nnsights_map(model: Any, change: Callable[[Any], None]) -> None:
    before = _check(model)
    change(model)
    after = _check(model)
    assert po.persistent_objects(model) == after
    if change in (_tokenizer_replaced, _level_moved):
        assert po.cache_for(model).walks == 1  # not the tree: nothing walked again
    if change in (_edit_through_envoy, _lazily_wrapped, _planted_child):
        assert len(after) == len(before) + 1


def test_a_request_editing_its_map_reaches_no_later_request(model: Any) -> None:
    given = _check(model)
    given["Module:model.lm_head"] = torch.nn.Linear(2, 2)
    given["Planted"] = object()
    given.clear()
    _check(model)
    assert po.cache_for(model).walks == 1


def test_a_model_with_its_own_map_is_walked_every_time(model: Any) -> None:
    class Custom(type(model)):  # type: ignore[misc]
        def _remoteable_persistent_objects(self) -> dict[str, Any]:
            return {**super()._remoteable_persistent_objects(), "Extra": self._module}

    model.__class__ = Custom
    _check(model)
    _check(model)
    assert po.cache_for(model)._ids is None


def test_an_envoy_class_with_its_own_walk_is_not_recorded(model: Any) -> None:
    from nnsight.intervention.envoy import Envoy

    class Walker(Envoy):  # type: ignore[misc]
        def _named_children(self) -> Any:
            return super()._named_children()

    model.model.norm.__class__ = Walker
    cache = po.cache_for(model)
    _check(model)
    _check(model)
    assert cache.walks == 2


def test_the_cache_goes_with_the_model(tiny_llama: Path) -> None:
    from nnsight import TransformersModel

    model = TransformersModel(str(tiny_llama), task="text-generation", dispatch=True, device_map="cpu")
    po.persistent_objects(model)
    assert model in po._REGISTRY
    count = len(po._REGISTRY)
    del model
    gc.collect()
    assert len(po._REGISTRY) == count - 1
