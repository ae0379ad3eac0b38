"""Reading values inside models, and running one level of a model on its own.

A level's input, its neurons and the terms of the residual sum it completes are *places* in the model
(`fedfuse.fusion.levels.Level`). For a traced model a place is a node of its graph, and a read runs the
smallest piece of the graph that computes the places asked for (`fedfuse.fusion.tracing.subgraph`), so
nothing past them is computed. For a model that declares its levels, a place is a declared module's input
or output, caught by a hook that stops the forward pass once everything asked for is caught.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fedfuse.fusion.levels import Level, LevelPlan
from fedfuse.fusion.tracing import input_node, runnable, subgraph, tapped


class Reader:
    """Reads places of models that share one `LevelPlan`'s architecture (the parents, the fused model)."""

    def __init__(self, plan: LevelPlan) -> None:
        self.plan = plan
        self._pieces: dict[tuple[int, tuple[str, ...], tuple[str, ...]], nn.Module] = {}

    def read(self, model: nn.Module, inputs: Tensor, places: Sequence[str]) -> list[Tensor]:
        """The values at ``places`` when ``model`` runs on ``inputs``."""
        if self.plan.graph is None:
            return _read_with_hooks(model, inputs, places)
        graph = self.plan.graph
        values = self._piece(model, (input_node(graph),), tuple(places))(inputs)
        return [values] if len(places) == 1 else list(values)

    def body(self, model: nn.Module, level: Level) -> nn.Module:
        """A module that computes ``level``'s output from its input with ``model``'s own parameters (shared:
        training it trains ``model``)."""
        if self.plan.graph is None:
            return model.get_submodule(level.input.rpartition(":")[0])
        return self._piece(model, (level.input,), (level.output,))

    def attribution_target(self, model: nn.Module, place: str) -> tuple[nn.Module, nn.Module]:
        """``(forward model, module)`` such that the module's output is the value at ``place``, for
        attribution methods that score a module's outputs."""
        if self.plan.graph is None:
            return model, model.get_submodule(place.rpartition(":")[0])
        return tapped(model, self.plan.graph, place)

    def _piece(self, model: nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> nn.Module:
        key = (id(model), inputs, outputs)
        if key not in self._pieces:
            assert self.plan.graph is not None
            self._pieces[key] = runnable(model, subgraph(self.plan.graph, inputs, outputs))
        return self._pieces[key]


class _Caught(Exception):
    """Stops a forward pass once every place asked for has been caught."""


def _read_with_hooks(model: nn.Module, inputs: Tensor, places: Sequence[str]) -> list[Tensor]:
    caught: dict[str, Tensor] = {}

    def catch(place: str, value: Tensor) -> None:
        caught[place] = value
        if len(caught) == len(set(places)):
            raise _Caught

    handles = []
    for place in dict.fromkeys(places):
        name, _, side = place.rpartition(":")
        module = model.get_submodule(name)
        if side == "input":
            handles.append(module.register_forward_pre_hook(lambda _, args, p=place: catch(p, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _, __, out, p=place: catch(p, out)))
    try:
        model(inputs)
    except _Caught:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [place for place in places if place not in caught]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing}")
    return [caught[place] for place in places]
