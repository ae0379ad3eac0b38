"""The peer methods FedFuse is compared with, by name, each one call from the same inputs to one model.

Every method gets what FedFuse gets and no more: the K client models, the server's calibration set (where
it uses data; none of them uses its labels) and the run's seed. Flower's strategies get the clients' Flower
replies, the same models with the example counts every Flower reply carries.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor, nn

from simulations.baselines.distillation import distill
from simulations.baselines.flower_strategies import FLOWER_STRATEGIES, flower_aggregate
from simulations.baselines.ot_fusion import ot_fusion
from simulations.baselines.regmean import regmean
from simulations.baselines.weight_matching import weight_matching_merge


@dataclass(frozen=True)
class PeerInputs:
    """What a peer method merges from.

    Attributes:
        models: the K client models, in partition order (not modified).
        calibration: the server's labelled calibration set ``(x, y)``.
        seed: the run's seed.
        replies: the clients' Flower training replies of the one-shot round (Flower's strategies only).
    """

    models: Sequence[nn.Module]
    calibration: tuple[Tensor, Tensor]
    seed: int
    replies: Sequence[Message] = ()


def _flower(name: str) -> Callable[[PeerInputs], nn.Module]:
    def aggregate(inputs: PeerInputs) -> nn.Module:
        if not inputs.replies:
            raise ValueError(f"{name} aggregates the clients' Flower replies, and none were given")
        model = copy.deepcopy(inputs.models[0])
        model.load_state_dict(flower_aggregate(name, inputs.replies).to_torch_state_dict())
        return model.eval()

    return aggregate


#: Name (as ``--methods`` takes it) → the method.
PEER_METHODS: dict[str, Callable[[PeerInputs], nn.Module]] = {
    "git-rebasin": lambda p: weight_matching_merge(p.models, p.calibration[0][:8], p.seed),
    "ot-fusion": lambda p: ot_fusion(p.models, p.calibration[0]),
    "regmean": lambda p: regmean(p.models, p.calibration[0]),
    "distillation": lambda p: distill(p.models, p.calibration[0], p.seed),
    **{name: _flower(name) for name in FLOWER_STRATEGIES},
}


def run_peer(name: str, inputs: PeerInputs) -> nn.Module:
    """Peer method ``name`` on ``inputs``.

    Raises:
        ValueError: an unknown name (the known ones listed), or the method's own refusal.
    """
    if name not in PEER_METHODS:
        raise ValueError(f"unknown peer method {name!r}; choose from {', '.join(PEER_METHODS)}")
    return PEER_METHODS[name](inputs)
