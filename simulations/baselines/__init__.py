"""What FedFuse is compared with, each from the same K client models (and, where it uses data, the same
server calibration set): weight averaging, the clients' ensembles, and the peer methods (`PEER_METHODS`:
Git Re-Basin, OT fusion, RegMean, ensemble distillation, Flower's own strategies)."""

from simulations.baselines.averaging import average_state_dicts
from simulations.baselines.ensembles import (
    ENSEMBLES,
    StackedEnsemble,
    client_logits,
    ensemble_log_probabilities,
    ensemble_logits,
    ensemble_predictions,
)
from simulations.baselines.peers import PEER_METHODS, PeerInputs, run_peer

__all__ = [
    "ENSEMBLES",
    "PEER_METHODS",
    "PeerInputs",
    "StackedEnsemble",
    "average_state_dicts",
    "client_logits",
    "ensemble_log_probabilities",
    "ensemble_logits",
    "ensemble_predictions",
    "run_peer",
]
