"""The clients' ensembles: K models at inference, the references a fused model is measured against.

Every ensemble here gets at most the information FedFuse gets, so the strongest of them is the fair
bar: the plain logit and softmax averages use nothing but the client models; the class-weighted ones use
the per-class weights FedFuse estimates on the server's labelled calibration set
(`fedfuse.fusion.class_weights`); the stacked one fits a multinomial logistic regression to the
calibration labels on the clients' concatenated logits (Wolpert's stacked generalisation), the ensemble
counterpart of FedFuse's head fitted to the calibration labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfuse.fusion import class_weights
from simulations.training import predict

#: The ensembles `ensemble_predictions` gives, each with at most FedFuse's information.
ENSEMBLES = (
    "ensemble logits",
    "ensemble softmax",
    "ensemble logits, class-weighted",
    "ensemble softmax, class-weighted",
    "ensemble stacked",
)


def client_logits(models: Sequence[nn.Module], x: Tensor, batch_size: int = 512) -> Tensor:
    """``[K, N, C]`` every client's logits on ``x``."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    return torch.stack([predict(model, x, batch_size) for model in models])


def ensemble_logits(
    models: Sequence[nn.Module], x: Tensor, batch_size: int = 512, class_weights: Tensor | None = None
) -> Tensor:
    """The clients' logits averaged, float32 [N, C]: uniformly, or per class by ``class_weights``
    ``[K, C]`` (each column summing to 1)."""
    logits = client_logits(models, x, batch_size)
    if class_weights is None:
        return logits.mean(dim=0)
    return (logits * class_weights.to(logits)[:, None, :]).sum(dim=0)


def ensemble_log_probabilities(
    models: Sequence[nn.Module], x: Tensor, batch_size: int = 512, class_weights: Tensor | None = None
) -> Tensor:
    """The log of the clients' softmax probabilities averaged (uniformly, or per class by
    ``class_weights``), float32 [N, C]: usable as logits (their softmax is the mixture, renormalised)."""
    probabilities = F.softmax(client_logits(models, x, batch_size), dim=-1)
    weights = (
        torch.full_like(probabilities[:, :1, :], 1 / len(models))
        if class_weights is None
        else (class_weights.to(probabilities)[:, None, :])
    )
    mixture = (probabilities * weights).sum(dim=0)
    return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()


class StackedEnsemble:
    """A multinomial logistic regression on the clients' concatenated logits, fitted on labelled data
    (the server's calibration set): it learns which client to trust for what, from the same labels
    FedFuse's head is fitted to.

    Args:
        models: the K client models.
        x, y: the labelled calibration set.
        regularisation: scikit-learn's ``C`` (inverse L2 strength) on standardised logits.
    """

    def __init__(
        self, models: Sequence[nn.Module], x: Tensor, y: Tensor, regularisation: float = 1.0
    ) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.models = list(models)
        features = self._features(x)
        self.scaler = StandardScaler().fit(features)
        self.classes = int(client_logits(self.models[:1], x[:1]).shape[-1])
        self.regression = LogisticRegression(C=regularisation, max_iter=2000).fit(
            self.scaler.transform(features), y.numpy()
        )

    def _features(self, x: Tensor) -> np.ndarray:
        logits = client_logits(self.models, x)
        return logits.permute(1, 0, 2).reshape(logits.shape[1], -1).numpy()

    def log_probabilities(self, x: Tensor) -> Tensor:
        """``[N, C]`` log-probabilities (classes the calibration labels lack get a tiny probability)."""
        known = self.regression.predict_log_proba(self.scaler.transform(self._features(x)))
        out = np.full((len(x), self.classes), np.log(np.finfo(np.float32).tiny), dtype=np.float32)
        out[:, self.regression.classes_] = known
        return torch.from_numpy(out)


def ensemble_predictions(
    models: Sequence[nn.Module], calibration: tuple[Tensor, Tensor], x: Tensor
) -> dict[str, Tensor]:
    """Every ensemble of `ENSEMBLES` on ``x`` (logits or log-probabilities, ``[N, C]``), the class weights
    and the stacked regression measured on the labelled ``calibration`` set, as FedFuse measures its own."""
    weights = class_weights(models, calibration)
    stacked = StackedEnsemble(models, *calibration)
    return dict(
        zip(
            ENSEMBLES,
            (
                ensemble_logits(models, x),
                ensemble_log_probabilities(models, x),
                ensemble_logits(models, x, class_weights=weights),
                ensemble_log_probabilities(models, x, class_weights=weights),
                stacked.log_probabilities(x),
            ),
        )
    )
