"""Simulations comparing FedFuse with FedAvg: data, partitioning, local training, baselines, demos."""
