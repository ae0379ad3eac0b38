"""Server-side ensemble distillation, FedDF-style (Lin, Kong, Stich & Jaggi, "Ensemble Distillation for
Robust Model Fusion in Federated Learning", NeurIPS 2020).

The server starts from the clients' averaged model (FedDF's starting point; or a fresh model) and trains
it on its own inputs toward the clients' ensemble: the mean of their softmax outputs, with the
Kullback-Leibler divergence as the loss. Here the server's inputs are the calibration set FedFuse fuses
on (its labels unused), so distillation sees no more data than FedFuse does. The average is uniform: the
server is told nothing about the clients' data.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simulations.baselines.averaging import average_state_dicts
from simulations.baselines.ensembles import client_logits

#: Where the student starts.
STARTS = ("average", "fresh")


def distill(
    models: Sequence[nn.Module],
    x: Tensor,
    seed: int,
    *,
    start: str = "average",
    fresh: nn.Module | None = None,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> nn.Module:
    """A student distilled on ``x`` toward the mean softmax of ``models``.

    Args:
        models: the K client models (teachers; not modified).
        x: the server's inputs (the calibration set's).
        seed: fixes the batches' order and the student's dropout (same seed, same student).
        start: ``"average"``: the teachers' uniform weight average; ``"fresh"``: ``fresh``, a model of the
            architecture with its own init.
        fresh: the fresh student, for ``start="fresh"``.
        epochs, lr, batch_size: Adam's passes over ``x``, learning rate and batch.
        temperature: of both the teachers' and the student's softmax.

    Raises:
        ValueError: no models, an unknown start, or ``start="fresh"`` without a model.
    """
    if not models:
        raise ValueError("distillation needs at least one teacher model")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}, got {start!r}")
    if start == "fresh" and fresh is None:
        raise ValueError("start='fresh' needs the fresh student model")
    if start == "average":
        student = copy.deepcopy(models[0])
        student.load_state_dict(average_state_dicts([m.state_dict() for m in models], [1.0] * len(models)))
    else:
        student = copy.deepcopy(fresh)
    targets = F.softmax(client_logits(models, x) / temperature, dim=-1).mean(dim=0)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    shuffler = torch.Generator().manual_seed(seed)
    student.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=shuffler).split(batch_size):
                optimizer.zero_grad()
                log_probabilities = F.log_softmax(student(x[batch]) / temperature, dim=-1)
                loss = F.kl_div(log_probabilities, targets[batch], reduction="batchmean")
                loss.backward()
                optimizer.step()
    return student.eval()
