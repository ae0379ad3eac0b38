"""Reading values inside models, and running one level of a model on its own.

A level's input, its neurons and the terms of the residual sum it completes are *places* in the model
(`fedfuse.fusion.levels.Level`). For a traced model a place is a node of its graph, and a read runs the
smallest piece of the graph that computes the places asked for (`fedfuse.fusion.tracing.subgraph`), so
nothing past them is computed. For a model that declares its levels, a place is a declared module's input
or output, caught by a hook that stops the forward pass once everything asked for is caught.

Checkpoints keep a traced model from running from its input at every level: `Reader.advance` keeps, for
every calibration batch, a model's values at the cut of one place (the next level's input, and what
later nodes still need from before it, such as a residual block's input: `fedfuse.fusion.tracing.cut_at`),
computed from the previous checkpoint, and a read whose places the cut closes off (every path from the
input to them passes through it: `fedfuse.fusion.tracing.subgraph` accepts it) runs from there. Each model
then runs once per level rather than from the input, the forward work growing with the depth rather than
its square, inside residual blocks too. Checkpoints hold at most `CHECKPOINT_VALUES` values over all
models; past that, reads run from the input as before, so memory stays bounded whatever K and the
calibration set's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import Level, LevelPlan
from fedfuse.fusion.tracing import SharedCode, cut_at, input_node, runnable, shared_code, subgraph, tapped

#: The most values (float32: 4 bytes each) all checkpoints of one fusion hold together: 256 MiB.
CHECKPOINT_VALUES = 1 << 26

#: Where a chunk of calibration samples lies: (batch index, slice of the batch).
At = tuple[int, slice]


@dataclass(frozen=True)
class _Checkpoint:
    """A model's values at ``cut`` (node names), per calibration batch, per node."""

    cut: tuple[str, ...]
    batches: list[list[Tensor]]

    @property
    def size(self) -> int:
        return sum(value.numel() for values in self.batches for value in values)


class Reader:
    """Reads places of models that share one `LevelPlan`'s architecture (the parents, the fused model)."""

    def __init__(self, plan: LevelPlan, budget: list[int] | None = None) -> None:
        self.plan = plan
        # Pieces by (inputs, outputs), one compilation for every model of the plan (`shared_code`).
        self._pieces: dict[tuple[tuple[str, ...], tuple[str, ...]], SharedCode | None] = {}
        self._checkpoints: dict[int, _Checkpoint] = {}
        self._cuts: dict[str, tuple[str, ...]] = {}
        self._budget = budget if budget is not None else [CHECKPOINT_VALUES]  # shared by a fusion's readers

    def read(
        self, model: nn.Module, inputs: Tensor, places: Sequence[str], at: At | None = None
    ) -> list[Tensor]:
        """The values at ``places`` when ``model`` runs on ``inputs``: the samples ``at`` (batch, slice) of
        the calibration set, when given, which lets a checkpoint stand in for the first part of the model."""
        if self.plan.graph is None:
            return _read_with_hooks(model, inputs, places)
        checkpoint = self._checkpoints.get(id(model)) if at is not None else None
        piece = self._closed(model, checkpoint.cut, places) if checkpoint is not None else None
        if piece is not None and checkpoint is not None and at is not None:
            values = piece(model, *(value[at[1]] for value in checkpoint.batches[at[0]]))
        else:
            values = self._piece(model, (input_node(self.plan.graph),), tuple(places))(model, inputs)
        return [values] if len(places) == 1 else list(values)

    def advance(self, model: nn.Module, place: str, batches: Iterable[Tensor]) -> None:
        """Keep ``model``'s values at the cut of ``place`` for each calibration batch (computed from its
        checkpoint where that closes the cut off), in place of its checkpoint, while all checkpoints fit
        the budget and the cut holds only tensors of the batch's samples (not, say, a size)."""
        if self.plan.graph is None:
            return
        if place in self.cut(model):  # e.g. a shortcut's input, kept since its block began
            return
        old = self._checkpoints.pop(id(model), None)
        if old is not None:
            self._budget[0] += old.size
        cut = self._cut_at(place)
        kept = _Checkpoint(cut, [])
        with torch.no_grad():
            for index, inputs in enumerate(batches):
                values = self._read_from(model, old, inputs, cut, index)
                if not all(isinstance(v, Tensor) and v.dim() and len(v) == len(inputs) for v in values):
                    self._budget[0] += kept.size
                    return
                kept.batches.append(values)
                self._budget[0] -= sum(value.numel() for value in values)
                if self._budget[0] < 0:
                    self._budget[0] += kept.size
                    return
        self._checkpoints[id(model)] = kept

    def cut(self, model: nn.Module) -> tuple[str, ...]:
        """The places ``model``'s checkpoint holds (none without one)."""
        checkpoint = self._checkpoints.get(id(model))
        return checkpoint.cut if checkpoint is not None else ()

    def keep(self, model: nn.Module, place: str, values: Sequence[Tensor]) -> None:
        """Make ``values`` (``model``'s values at ``place``, one tensor per calibration batch, as a pass has
        just computed them: `Collected`) with the rest of ``place``'s cut, taken from the old checkpoint,
        its checkpoint, if the old one holds that rest and all fit the budget; else keep the old one."""
        if self.plan.graph is None:
            return
        old = self._checkpoints.get(id(model))
        held = dict(zip(old.cut, zip(*old.batches))) if old is not None else {}
        cut = self._cut_at(place)
        if any(node != place and node not in held for node in cut):
            return
        batches = [
            [value if node == place else held[node][index] for node in cut]
            for index, value in enumerate(values)
        ]
        kept = _Checkpoint(cut, batches)
        room = self._budget[0] + (old.size if old is not None else 0)
        if kept.size <= room:
            self._budget[0] = room - kept.size
            self._checkpoints[id(model)] = kept

    def _cut_at(self, place: str) -> tuple[str, ...]:
        if place not in self._cuts:
            assert self.plan.graph is not None
            self._cuts[place] = cut_at(self.plan.graph, place)
        return self._cuts[place]

    def _read_from(
        self,
        model: nn.Module,
        checkpoint: _Checkpoint | None,
        inputs: Tensor,
        places: tuple[str, ...],
        index: int,
    ) -> list[Tensor]:
        piece = self._closed(model, checkpoint.cut, places) if checkpoint is not None else None
        if piece is not None and checkpoint is not None:
            values = piece(model, *checkpoint.batches[index])
            return [values] if len(places) == 1 else list(values)
        return self.read(model, inputs, places)

    def _closed(self, model: nn.Module, cut: tuple[str, ...], places: Sequence[str]) -> SharedCode | None:
        """The piece computing ``places`` from the values at ``cut`` alone, or None when they need more."""
        key = (cut, tuple(places))
        if key not in self._pieces:
            assert self.plan.graph is not None
            try:
                self._pieces[key] = shared_code(model, subgraph(self.plan.graph, cut, tuple(places)))
            except ValueError:
                self._pieces[key] = None
        return self._pieces[key]

    def body(self, model: nn.Module, level: Level) -> nn.Module:
        """A module that computes ``level``'s output from its input with ``model``'s own parameters (shared:
        training it trains ``model``)."""
        if self.plan.graph is None:
            return model.get_submodule(level.input.rpartition(":")[0])
        return runnable(model, subgraph(self.plan.graph, (level.input,), (level.output,)))

    def attribution_targets(
        self, model: nn.Module, places: Sequence[str]
    ) -> tuple[nn.Module, list[nn.Module]]:
        """``(forward model, modules)`` such that module i's output is the value at ``places[i]``, for
        attribution methods that score a module's outputs."""
        if self.plan.graph is None:
            return model, [model.get_submodule(place.rpartition(":")[0]) for place in places]
        return tapped(model, self.plan.graph, places)

    def _piece(self, model: nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> SharedCode:
        key = (inputs, outputs)
        if key not in self._pieces:
            assert self.plan.graph is not None
            self._pieces[key] = shared_code(model, subgraph(self.plan.graph, inputs, outputs))
        piece = self._pieces[key]
        assert piece is not None
        return piece


class Collected:
    """Each model's values at one place over one pass, chunk by chunk, to become its checkpoint
    (`Reader.keep`): a pass that computes a level's output anyway saves the next level running it again."""

    def __init__(self) -> None:
        self._chunks: dict[int, dict[int, list[Tensor]]] = {}

    def add(self, model: nn.Module, at: At, value: Tensor) -> None:
        self._chunks.setdefault(id(model), {}).setdefault(at[0], []).append(value)

    def batches(self, model: nn.Module) -> list[Tensor]:
        """The values, one tensor per calibration batch, in order."""
        return [torch.cat(chunks) for _, chunks in sorted(self._chunks[id(model)].items())]


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
