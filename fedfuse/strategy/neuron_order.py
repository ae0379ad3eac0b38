"""Which clients' hidden neurons are not in the order the other clients share.

A round whose model the clients train further is fused by index (`fedfuse.strategy.fedfuse.continuing`):
neuron j of every client is taken for neuron j of the others, as FedAvg takes it. That holds for clients
that trained from the model they were sent, since training never moves a neuron to another place. A
client that permutes its hidden neurons breaks it while computing exactly what it computed, so the
screening sees nothing: fused by index, its neuron j is mixed with the others' unrelated neuron j. Found
by probing (digits MLPs, three rounds): two of six clients sending their honestly trained model with its
hidden neurons permuted every round cost the fused model 6-19 points, with nobody named and the guard
silent, since the model stalls rather than drops.

The check compares every client with the **reference**: the element-wise median of all the clients'
weights, a model in the order most clients share (a minority cannot move it far; the global model the
round sent is a poorer reference, since in the first rounds at a high learning rate honest clients move
far from it). For every space of free neurons (`fedfuse.fusion.levels.Space`), on a calibration batch:
the correlation over samples (and positions) of each neuron of the reference with each neuron of the
client. Were the client's neurons in a random order, the mean in-place correlation (neuron j with neuron
j) would be the mean over all pairs, give or take its spread over random orders (the pairs' standard
deviation over √n): its z-score would be about N(0, 1). The client is out of order in a space where its
z-score is at most `ORDER_Z`. A space too small for the test to tell (where even a client whose best
matches were all in place would not reach twice `ORDER_Z`: the 6 channels of a quickstart CNN's first
convolution) is not judged. Measured on the quickstart CNN after one epoch at SGD lr 0.1 from a random
init (three seeds, five clients): honest clients' z-scores 2.7-5.5 in the 16-channel convolution and
6.4-22.6 in the dense layers; a permuted copy's -2.6 to 1.0.

When half the clients or more are out of order, the clients share no order (each trained from its own
init, say) and the reference means nothing: no one is named, and the caller is told (`Orders.shared`).
A client that permutes only part of a layer can pass; what it moves is then only that part.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedfuse.fusion.levels import LevelPlan, Space
from fedfuse.fusion.reading import Reader

#: The largest z-score of its in-place correlation (against a random order's) at which a client's neurons
#: of a space count as out of order.
ORDER_Z = 2.0
#: Rows (samples times positions) of one space the correlations are measured on, at most.
ORDER_ROWS = 1 << 16


@dataclass(frozen=True)
class SpaceOrder:
    """How one space's neurons of a client line up with the reference's, over the neurons the reference
    uses on the batch (correlations in [-1, 1]).

    Attributes:
        space: the space's name.
        in_place: the mean correlation of the reference's neuron j with the client's neuron j.
        by_chance: the mean correlation over all pairs: what ``in_place`` would be in a random order.
        spread: the standard deviation of ``in_place`` over random orders (the pairs' over √n).
        best: the mean of each neuron's largest correlation with any neuron of the client.
    """

    space: str
    in_place: float
    by_chance: float
    spread: float
    best: float

    @property
    def z(self) -> float:
        """How many spreads ``in_place`` lies above a random order's."""
        return (self.in_place - self.by_chance) / self.spread if self.spread > 0 else float("inf")

    @property
    def judged(self) -> bool:
        """Whether the space can tell: a client in order at its best matches would score twice `ORDER_Z`."""
        return self.spread > 0 and (self.best - self.by_chance) / self.spread >= 2 * ORDER_Z

    @property
    def out_of_order(self) -> bool:
        return self.judged and self.z <= ORDER_Z

    def describe(self) -> str:
        return (
            f"its neurons of '{self.space}' are not in the order the other clients share: their mean "
            f"correlation with the neuron in the same place of the clients' element-wise median model is "
            f"{self.in_place:.2f}, what a random order gives ({self.by_chance:.2f} ± {self.spread:.2f}, "
            f"z = {self.z:.1f}), while their best matches elsewhere reach {self.best:.2f}; fused by index, "
            "its neurons would be mixed with unrelated ones"
        )


@dataclass(frozen=True)
class Orders:
    """The check of one round's clients.

    Attributes:
        spaces: per client, its `SpaceOrder` for every space measured.
        shared: whether most clients share one order (fewer than half are out of order); when not, no
            client is named.
    """

    spaces: list[list[SpaceOrder]]
    shared: bool

    @property
    def out_of_order(self) -> list[SpaceOrder | None]:
        """Per client, the first space in which it is out of order (None: in order, or not shared)."""
        if not self.shared:
            return [None] * len(self.spaces)
        return [next((s for s in spaces if s.out_of_order), None) for spaces in self.spaces]


def check_orders(clients: Sequence[nn.Module], plan: LevelPlan, inputs: Tensor) -> Orders:
    """Compare every client's neurons with the clients' element-wise median model (see the module).

    Args:
        clients: the round's models, one architecture (``plan``'s).
        plan: their levels (`fedfuse.describe_levels`).
        inputs: a calibration batch ``[N, ...]``.
    """
    spaces = [space for space in plan.spaces.values() if not space.fixed]
    reader = Reader(plan)  # one compiled piece for every model read (`fedfuse.fusion.reading`)
    reference = _standardised_rows(reader, median_model(clients), spaces, inputs)  # read once
    orders = [
        _space_orders(spaces, reference, _standardised_rows(reader, client, spaces, inputs))
        for client in clients
    ]
    flagged = sum(any(s.out_of_order for s in client) for client in orders)
    return Orders(orders, shared=2 * flagged < len(clients))


def median_model(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``models[0]`` holding the element-wise median of the models' parameters and buffers."""
    median = copy.deepcopy(models[0])
    states = [model.state_dict() for model in models]
    with torch.no_grad():
        for name, value in median.state_dict().items():
            if value.dtype == torch.bool:
                continue
            value.copy_(torch.stack([state[name] for state in states]).median(dim=0).values)
    return median


def _standardised_rows(reader: Reader, model: nn.Module, spaces: list[Space], inputs: Tensor) -> list[Tensor]:
    """Per space, ``model``'s neurons on ``inputs`` as standardised rows ``[rows, n]`` (`_standardised`)."""
    if not spaces:
        return []
    with torch.no_grad():
        values = reader.read(model.eval(), inputs, [space.points[0].place for space in spaces])
    return [
        _standardised(_rows(value, space.points[0].axis).double()) for space, value in zip(spaces, values)
    ]


def _space_orders(spaces: list[Space], reference: list[Tensor], client: list[Tensor]) -> list[SpaceOrder]:
    """Per space, how the client's standardised neurons line up with the reference's (a space whose
    neurons never vary in the reference is not measured)."""
    orders = []
    for space, ours, theirs in zip(spaces, reference, client, strict=True):
        correlation, live = ours.T @ theirs / len(ours), ours.abs().sum(0) > 0
        if not bool(live.any()):
            continue
        pairs = correlation[live]
        orders.append(
            SpaceOrder(
                space.name,
                in_place=float(correlation.diagonal()[live].mean()),
                by_chance=float(pairs.mean()),
                spread=float(pairs.std() / len(pairs) ** 0.5),
                best=float(pairs.max(dim=1).values.mean()),
            )
        )
    return orders


def _standardised(values: Tensor) -> Tensor:
    """Each column centred and divided by its standard deviation (a constant column: zeros), so that the
    correlations between two sets of columns are one product."""
    centred = values - values.mean(0)
    scale = centred.square().mean(0).sqrt()
    return torch.where(scale > 0, centred / scale.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def _rows(values: Tensor, axis: int) -> Tensor:
    """``values`` as rows of neurons ``[rows, n]`` (at most `ORDER_ROWS`, evenly spaced)."""
    rows = values.movedim(axis, -1).reshape(-1, values.shape[axis])
    step = -(-len(rows) // ORDER_ROWS)
    return rows[::step]
