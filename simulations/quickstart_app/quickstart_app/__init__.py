"""quickstart_app: Flower's quickstart-pytorch, offline, with FedFuse in place of FedAvg."""
