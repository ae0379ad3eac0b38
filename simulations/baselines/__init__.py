"""What FedFuse is compared with, each from the same K client models (and, where it uses data, the same
server calibration set): weight averaging and the clients' ensembles."""

from simulations.baselines.averaging import average_state_dicts
from simulations.baselines.ensembles import (
    ENSEMBLES,
    StackedEnsemble,
    client_logits,
    ensemble_log_probabilities,
    ensemble_logits,
    ensemble_predictions,
)

__all__ = [
    "ENSEMBLES",
    "StackedEnsemble",
    "average_state_dicts",
    "client_logits",
    "ensemble_log_probabilities",
    "ensemble_logits",
    "ensemble_predictions",
]
