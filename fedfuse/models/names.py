"""The zoo's model names, apart from the models so that listing them (a command line's choices) loads no
PyTorch."""

MODEL_NAMES = ("mlp", "cnn", "lenet", "cnn-bn", "vgg11", "vgg11-bn", "resnet8", "resnet18", "vit")
