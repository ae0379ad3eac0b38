"""A Flower app that trains one model over a federation with FedFuse (or FedAvg, to compare)."""
