"""The data sets and splits the loaders read, apart from the loaders so that listing them (a command
line's choices) loads neither PyTorch nor scikit-learn."""

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")
DATASET_NAMES = ("digits", *IDX_DATASETS, "cifar10")
SPLITS = ("t10k", "train")
