"""The Flower layer: `FedFuse`, a FedAvg that fuses the clients' models instead of averaging them.

Needs the ``flower`` extra (``pip install fedfuse[flower]``); the fusion engine itself does not.
"""

from fedfuse.strategy.fedfuse import FedFuse

__all__ = ["FedFuse"]
