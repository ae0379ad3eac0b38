"""Git Re-Basin by weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023), with their MergeMany for K > 2: data-free.

Hidden neurons can be permuted without changing a network's function. Weight matching looks for the
permutation of each space of model B that makes B's weights closest to model A's (maximising
``Σ <W_A, P W_B P_prevᵀ>`` over all layers touching that space), one space at a time with the others held
fixed (a linear assignment problem each, solved by scipy's Hungarian-style `linear_sum_assignment`), in a
random order, until a whole pass changes nothing. MergeMany aligns each model in turn to the mean of the
others, then averages; its passes start here from each model matched to model 0 alone (the two-model
case), which keeps MergeMany from settling on a mean of still-unaligned models (from identity orders, three
permuted copies of a LeNet merged to weights off by 0.26). Model 0 stays in its own order (the paper
permutes every model, which only changes the basis the merged model is written in), so the merge of exact
permuted copies of a model is that model, weight for weight.

Why this is written here rather than taken from the ``rebasin`` package (0.0.47, which pulls in torchview
and graphviz): it installs and runs with torch 2.13, but matching a copy of this project's LeNet with all
hidden neurons permuted (`tests.permutation.permuted_copy`) left weights off by 0.21, where this loop,
over the traced levels that name every space and its readers (`fedfuse.fusion.levels`), recovers it
exactly. The cause inside ``rebasin`` was not looked into.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from simulations.baselines.alignment import (
    AlignedLayer,
    alignable_plan,
    aligned_model,
    free_spaces,
    layers_of,
    map_layer,
    permutation_matrix,
)
from simulations.baselines.averaging import average_state_dicts

#: Passes over the spaces (or over the models, for MergeMany) before giving up on convergence.
MAX_PASSES = 100


def weight_matching_merge(models: Sequence[nn.Module], example: Tensor, seed: int) -> nn.Module:
    """The uniform average of ``models`` after MergeMany's weight matching: one model, in model 0's order.

    Args:
        models: K >= 1 models of one architecture whose levels are all Linear/Conv layers.
        example: a few inputs the models accept (to trace the levels; no statistics are taken).
        seed: orders the spaces and models visited (same seed, same model).

    Raises:
        ValueError: no models, or a level weight matching cannot permute (named).
    """
    if not models:
        raise ValueError("weight matching needs at least one model")
    plan = alignable_plan(models[0], example, "Git Re-Basin weight matching")
    spaces = free_spaces(plan)
    layers = [layers_of(model, plan) for model in models]
    identity = {s: torch.arange(plan.spaces[s].width) for s in spaces}
    rng = np.random.default_rng(seed)
    orders = [identity] + [
        match_weights(layers[0], layers[i], spaces, identity, rng) for i in range(1, len(models))
    ]
    for _ in range(MAX_PASSES):
        changed = False
        for i in rng.permutation(np.arange(1, len(models))):
            others = [_permuted(layers[j], orders[j]) for j in range(len(models)) if j != i]
            target = [_mean([model[n] for model in others]) for n in range(len(plan.levels))]
            order = match_weights(target, layers[i], spaces, orders[i], rng)
            changed |= any(not torch.equal(order[s], orders[i][s]) for s in spaces)
            orders[i] = order
        if not changed:
            break
    aligned = [
        aligned_model(model, plan, {s: permutation_matrix(order[s]) for s in spaces})
        for model, order in zip(models, orders)
    ]
    merged = aligned[0]
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in aligned], [1.0] * len(aligned)))
    return merged.eval()


def match_weights(
    target: Sequence[AlignedLayer],
    layers: Sequence[AlignedLayer],
    spaces: Sequence[str],
    start: dict[str, Tensor],
    rng: np.random.Generator,
) -> dict[str, Tensor]:
    """Per space, the order of ``layers``' neurons that best matches ``target``'s (Ainsworth et al.'s
    Algorithm 1: coordinate descent over spaces, each a linear assignment), from ``start``."""
    orders = dict(start)
    for _ in range(MAX_PASSES):
        changed = False
        for space in rng.permutation(np.array(spaces, dtype=object)):
            similarity = _similarity(space, target, layers, orders)
            _, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
            order = torch.as_tensor(columns)
            if float(similarity[torch.arange(len(order)), order].sum()) > float(
                similarity[torch.arange(len(order)), orders[space]].sum()
            ) + 1e-12 * float(similarity.abs().sum()):
                orders[space], changed = order, True
        if not changed:
            break
    return orders


def _similarity(
    space: str, target: Sequence[AlignedLayer], layers: Sequence[AlignedLayer], orders: dict[str, Tensor]
) -> Tensor:
    """``[n, n]``: entry (a, b) is how much the weights touching ``space`` agree when the model's neuron b
    takes target neuron a's place, every other space in its current order."""
    others = {s: permutation_matrix(o) for s, o in orders.items() if s != space}
    total = None
    for goal, layer in zip(target, layers):
        level = layer.level
        if level.space != space and level.source != space:
            continue
        moved = map_layer(layer, others)  # every other space already in place
        if level.space == space:  # the neurons written: rows
            score = goal.weight.flatten(1) @ moved.weight.flatten(1).T + goal.vectors @ moved.vectors.T
        else:  # the neurons read: input channel blocks
            score = torch.einsum("acp,abp->cb", goal.weight, moved.weight)
        total = score if total is None else total + score
    assert total is not None, f"space {space!r} has no level"
    return total


def _permuted(layers: Sequence[AlignedLayer], orders: dict[str, Tensor]) -> list[AlignedLayer]:
    maps = {s: permutation_matrix(o) for s, o in orders.items()}
    return [map_layer(layer, maps) for layer in layers]


def _mean(layers: Sequence[AlignedLayer]) -> AlignedLayer:
    return AlignedLayer(
        layers[0].level,
        torch.stack([layer.weight for layer in layers]).mean(dim=0),
        torch.stack([layer.vectors for layer in layers]).mean(dim=0),
    )
