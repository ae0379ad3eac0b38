"""quickstart_app: the model, the data and the training, as in Flower's quickstart-pytorch.

The Net is the quickstart's, as written there. The data are local (nothing is downloaded): the
embedded digits (8x8, upsampled to 32x32) or MNIST read from ``data-dir`` (28x28, padded to 32x32),
as three-channel images normalised like the quickstart's CIFAR-10. Every node cuts the same seeded
split on its own: the server keeps a calibration set and an evaluation set, the clients share the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from simulations.datasets import Dataset, load_dataset
from simulations.partitioning import dirichlet, iid, split_server_sets

SIDE = 32  # the Net's input: 3x32x32 images


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz'), as in Flower's quickstart."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@functools.lru_cache(maxsize=2)
def load_images(dataset: str, data_dir: str) -> Dataset:
    """The data set as 3x32x32 images normalised to [-1, 1] (read once per process)."""
    data = load_dataset(dataset, data_dir or None)
    x = data.x
    if x.shape[-1] < SIDE and SIDE % x.shape[-1] == 0:
        x = F.interpolate(x, scale_factor=SIDE // x.shape[-1], mode="nearest")  # digits: 8 -> 32
    pad = (SIDE - x.shape[-1]) // 2
    x = F.pad(x, (pad, SIDE - x.shape[-1] - pad) * 2)  # MNIST: 28 -> 32
    x = (x.expand(-1, 3, -1, -1) - 0.5) / 0.5
    return Dataset(x.contiguous(), data.y, data.name, data.num_classes)


def split(run_config: Mapping) -> tuple[Dataset, np.ndarray, np.ndarray, np.ndarray]:
    """``(data, client pool, calibration, evaluation)``: the same on every node for the same config."""
    data = load_images(str(run_config["dataset"]), str(run_config["data-dir"]))
    pool, calibration, evaluation = split_server_sets(
        data.y.numpy(),
        int(run_config["calibration-size"]),
        int(run_config["evaluation-size"]),
        int(run_config["seed"]),
    )
    return data, pool, calibration, evaluation


def load_data(partition_id: int, num_partitions: int, run_config: Mapping) -> tuple[DataLoader, DataLoader]:
    """This client's partition of the pool, 80% to train on and 20% to test on, as in the quickstart."""
    data, pool, _, _ = split(run_config)
    labels, seed = data.y.numpy()[pool], int(run_config["seed"])
    if run_config["partitioning"] == "dirichlet":
        parts = dirichlet(labels, num_partitions, float(run_config["dirichlet-alpha"]), seed)
    else:
        parts = iid(labels, num_partitions, seed)
    mine = pool[parts[partition_id]]
    cut = int(len(mine) * 0.8)
    trainset = data.subset(mine[:cut])
    testset = data.subset(mine[cut:])
    batch_size = int(run_config["batch-size"])
    # Shuffled by torch's global generator, which the ClientApp seeds per client and round: a new order
    # every round, as a client that reshuffles each epoch sees, and the same in every run of one config.
    trainloader = DataLoader(TensorDataset(trainset.x, trainset.y), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(TensorDataset(testset.x, testset.y), batch_size=batch_size)
    return trainloader, testloader


def load_server_sets(run_config: Mapping) -> tuple[tuple[torch.Tensor, torch.Tensor], DataLoader]:
    """The server's calibration set ``(images, labels)`` and its evaluation set as a DataLoader."""
    data, _, calibration, evaluation = split(run_config)
    calibration_set, evaluation_set = data.subset(calibration), data.subset(evaluation)
    evaluation_loader = DataLoader(TensorDataset(evaluation_set.x, evaluation_set.y), batch_size=128)
    return (calibration_set.x, calibration_set.y), evaluation_loader


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set: mean loss per batch, and accuracy."""
    net.to(device)
    net.eval()
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
