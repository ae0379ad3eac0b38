"""Weight averaging: one-shot FedAvg's aggregation, entry by entry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean of K state_dicts, entry by entry: FedAvg's aggregation done once.

    With weights = client example counts this is one-shot FedAvg. Means are taken in float64 and
    cast back to each entry's dtype; integer buffers (BatchNorm's ``num_batches_tracked``) are
    rounded to the nearest integer. The models are not aligned first, so parents trained from
    different initialisations average to a model near chance: that is the failure fusion fixes.

    Args:
        state_dicts: K state_dicts with the same keys, shapes and dtypes.
        weights: K non-negative weights, not all zero (normalised here).

    Returns:
        A new state_dict (tensors on the CPU) to ``load_state_dict`` into a model of the same
        architecture.

    Raises:
        ValueError: no state_dicts, a weight count that differs from K, negative or all-zero
            weights, or state_dicts whose keys or shapes differ.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state_dict")
    if len(weights) != len(state_dicts):
        raise ValueError(f"got {len(weights)} weights for {len(state_dicts)} state_dicts")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
    w = w / w.sum()
    first = state_dicts[0]
    for k, state in enumerate(state_dicts[1:], start=1):
        if state.keys() != first.keys():
            raise ValueError(f"state_dict {k} has keys that differ from state_dict 0's")
        for key, reference in first.items():
            if state[key].shape != reference.shape:
                raise ValueError(
                    f"{key!r}: state_dict {k} has shape {list(state[key].shape)}, "
                    f"state_dict 0 {list(reference.shape)}"
                )
    averaged = {}
    for key, reference in first.items():
        mean = sum(wk * state[key].detach().cpu().double() for wk, state in zip(w, state_dicts))
        averaged[key] = (mean if reference.is_floating_point() else mean.round()).to(reference.dtype)
    return averaged
