"""The configuration of one fusion: what to group by, how to score neurons, how to fit."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: The two ways a level is fitted; a config may also say ``"auto"`` (`FusionConfig.variant`).
VARIANTS = ("linear", "gradient")
OPTIMIZERS = ("adam", "sgd")
LEVEL_INITS = ("aligned", "fresh")
CLASS_WEIGHTS = ("calibration", "uniform")
OUTPUT_TARGETS = ("labels", "logits", "log_probabilities", "auto")
PRIORS = ("parents", "zero")
SHARPNESS_LIMITS = ("none", "parents")
RESCALINGS = ("parents", "none")
GROUPINGS = ("kmeans", "hungarian", "index")
KMEANS_INITS = ("reference", "k-means++")
IMPORTANCES = ("uniform", "gradient_x_activation", "conductance", "deeplift")


@dataclass(frozen=True)
class FusionConfig:
    """How `fuse` merges K parent models into one.

    Attributes:
        variant: how each fused level is fitted to its group targets. ``"linear"``: closed-form ridge
            least squares over the level's inputs (patches, for convolutions), the fused model's own
            previous levels feeding it; it refuses a model with blocks. ``"gradient"``: a few epochs of
            gradient descent per level, which fits any level (a residual block, a transformer block)
            and any declared architecture. ``"auto"`` (the default): the linear variant's closed form
            for every level it fits, gradient descent for the blocks (attention, an LSTM), so that any
            model a user writes is fused; a model without blocks is fused exactly as by ``"linear"``.
        grouping: how the K·n parent neurons of a level are grouped into n fused neurons.
            ``"kmeans"``: importance-weighted k-means, any K. ``"hungarian"``: optimal one-to-one
            matching of the two parents' neurons, K = 2 only. ``"index"``: neuron j of every parent
            makes fused neuron j, no search: for parents that share an ancestor, as the clients of one
            Flower round do (they all start from the global model, and training never moves neuron j
            to another place), the correspondence FedAvg assumes; the parents' width only.
        importance: the neuron importance score s_j that weights grouping and targets, each parent's
            normalised over its own neurons (a parent counts by its weight, not by its scores' size).
            ``"uniform"``: all ones. ``"gradient_x_activation"``: mean |activation × gradient| (one
            forward and backward pass per parent for every level at once, about 1.6 times uniform's
            fusion time). ``"conductance"``: captum's LayerConductance. ``"deeplift"``: captum's
            LayerDeepLift. Attribution targets are the calibration labels, or each parent's own
            prediction when there are none. On issue 9's MNIST grid (K = 5 and 10, three Dirichlet
            alphas, two inits) gradient × activation came within 1 point of the best ensemble in all
            12 cells, but by 0.03 at the closest and no nearer than uniform on average (which misses
            one cell by 0.05-0.1), so uniform stays the default (docs/benchmarks.md).
        ridge: how strongly each least-squares fit is pulled toward its prior, relative to the mean
            diagonal of XᵀX (so it is unit-free); the bias is not pulled. 0: the exact least-squares
            fit nearest the prior (with ``prior="zero"``, the paper's pseudo-inverse).
        prior: what the fits are pulled toward. ``"parents"``: the group members' own weights,
            re-indexed through the previous level's grouping and averaged with the group shares
            (`fedfuse.fusion.prior`), which keeps the fused weights the parents' size and keeps the
            parents' knowledge where the calibration set says nothing. ``"zero"``: plain ridge.
        class_weights: how the output layer weights each parent per class when ``fuse`` is given no
            ``weights``. ``"calibration"``: estimated on the labelled calibration set, nothing asked of
            the clients (`fedfuse.fusion.weights`); ``"uniform"``: all parents alike.
        class_weight_sharpness: the power of the parents' true-class probabilities in the calibration
            weights: higher favours each class's experts more.
        output_target: what the output layer (the classes) is fitted to. ``"labels"``: the calibration
            labels (the log of label-smoothed one-hot vectors), so the fused head is a linear probe of
            the fused features, pulled toward the parents' aligned head; without labels, ``"logits"``.
            ``"logits"``: the class-weighted mean of the parents' logits (the paper's target).
            ``"log_probabilities"``: the log of the class-weighted mean of their probabilities (the
            softmax ensemble's log-probabilities). ``"auto"``: the labels, unless another of the three
            classifies significantly more held-out calibration samples right, by 5-fold cross-validation
            (`fedfuse.fusion.head_choice`); without labels, for a head that is not one Linear row per
            sample or whose features on the calibration set exceed 2**24 values, or in the gradient
            variant, as ``"labels"``. Measured in docs/benchmarks.md.
        batch_size: calibration samples per forward pass when the calibration set is a tensor or
            an ``(inputs, labels)`` pair (a DataLoader keeps its own batches). Bounds peak memory.
        seed: seeds k-means; the same seed gives the same fused weights, bit for bit, on CPU.
        kmeans_init: how k-means starts: ``"k-means++"``, seeded k-means++ restarts (``kmeans_n_init``
            of them; cost O(K·n · n · r · log n) each); ``"reference"``, from the reference parent's
            neurons (one Lloyd run, several times faster at large K, but about 1 point less accurate
            at K = 4-8 on MNIST; k-means++ when the fused width differs from the parents'). Measured
            in docs/benchmarks.md.
        kmeans_n_init: k-means++ restarts; the run with the lowest weighted cost is kept. One by
            default: on MNIST (K = 2-8, MLP and CNN) three restarts lowered the grouping cost by
            0-2% and gained no accuracy, at three times the grouping's time (docs/benchmarks.md).
        kmeans_max_iter: Lloyd iterations per restart.
        grouping_dims: the most dimensions of the points grouping works on (`fedfuse.fusion.embedding`):
            exact while the calibration rows, or the K·n parent neurons, number at most this; above
            it, a seeded sketch whose squared distances have a relative error of about √(2/dims).
        grouping_variance: k-means works on the leading principal components of the neurons' points
            that hold this share of their importance-weighted variance (`fedfuse.fusion.clustering.
            principal_components`): any grouping's k-means cost there is within 1 − grouping_variance of
            the points' spread of its cost on all dimensions, and the work falls with the dimensions
            (eight MNIST MLPs: 204 of 400 dimensions; at 0.99, 73, but up to 0.4 points less accurate on
            the fusion benchmark: docs/benchmarks.md). 1 keeps every dimension.
        conductance_steps: integration steps of conductance (the paper uses 10).
        progress: show a progress bar over levels.
        width_multiplier: fused hidden levels get round(multiplier · width) neurons (k-means makes any
            number of groups); 1 keeps parent 0's architecture. Sequential chains only; with K parents,
            up to K keeps every parent neuron apart.

    The gradient variant's fit (and the auto variant's, for blocks; ignored by the linear variant):
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        learning_rate: the optimiser's step size.
        epochs: most passes over the calibration set per level.
        patience: stop a level after this many epochs without a better held-out loss; the best
            weights are restored.
        validation_fraction: share of the calibration samples held out for early stopping.
        level_init: ``"aligned"``: a layer starts from the parents' aligned average (the prior), a block
            from the reference parent's weights (the parent with the lowest calibration loss, whose
            neurons the groups are ordered like, so they line up); ``"fresh"``: from a seeded random
            init.
        fit_batch_size: samples per gradient step.

    After fusion (either variant):
        polish_epochs: most epochs of a short polish of the whole fused model on the labelled
            calibration set, toward the labels and the parents' class-weighted softmax ensemble, with
            early stopping (`fedfuse.fusion.polish`); 0 (the default) leaves it out.
        sharpness_limit: ``"parents"``: for a fused model that clients will train further, raise the
            ridge (toward the aligned prior) until the fused model's loss is no sharper on the
            calibration set than its parents' median (`fedfuse.fusion.sharpness`): clients trained by
            SGD sit at the sharpness their learning rate allows, and a sharper start diverges. Needs
            labels. ``"none"`` (the default): the most accurate fit.
        rescale: ``"parents"`` (the default): the fused model's free layer scales (a ReLU network
            computes the same when a hidden layer is multiplied by c and the layers reading it by 1/c)
            are chosen so that each layer is as near its parents' mean weight norm as can be
            (`fedfuse.fusion.rescaling`): the fitted function, sized like the clients' models, so the
            next round trains from weights the size of its own. ``"none"``: the scales the fits left.
    """

    variant: str = "auto"
    grouping: str = "kmeans"
    importance: str = "uniform"
    ridge: float = 1e-2
    prior: str = "parents"
    class_weights: str = "calibration"
    class_weight_sharpness: float = 2.0
    output_target: str = "labels"
    batch_size: int = 256
    seed: int = 0
    kmeans_init: str = "k-means++"
    kmeans_n_init: int = 1
    kmeans_max_iter: int = 300
    grouping_dims: int = 1024
    grouping_variance: float = 0.999
    conductance_steps: int = 10
    progress: bool = False
    width_multiplier: float = 1.0
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    epochs: int = 100
    patience: int = 10
    validation_fraction: float = 0.2
    level_init: str = "aligned"
    polish_epochs: int = 0
    sharpness_limit: str = "none"
    rescale: str = "parents"
    fit_batch_size: int = 32

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, ("auto", *VARIANTS))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("level_init", self.level_init, LEVEL_INITS)
        _check_choice("grouping", self.grouping, GROUPINGS)
        _check_choice("kmeans_init", self.kmeans_init, KMEANS_INITS)
        _check_choice("importance", self.importance, IMPORTANCES)
        _check_choice("prior", self.prior, PRIORS)
        _check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
        _check_choice("output_target", self.output_target, OUTPUT_TARGETS)
        _check_choice("sharpness_limit", self.sharpness_limit, SHARPNESS_LIMITS)
        _check_choice("rescale", self.rescale, RESCALINGS)
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise TypeError(f"FusionConfig.ridge must be a number, got {type(self.ridge).__name__}")
        if not math.isfinite(self.ridge) or self.ridge < 0:
            raise ValueError(f"FusionConfig.ridge must be finite and >= 0, got {self.ridge}")
        for name in (
            "batch_size",
            "kmeans_n_init",
            "kmeans_max_iter",
            "grouping_dims",
            "conductance_steps",
            "epochs",
            "patience",
            "fit_batch_size",
        ):
            _check_positive_int(name, getattr(self, name))
        if not (
            isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise ValueError(
                f"FusionConfig.learning_rate must be a positive number, got {self.learning_rate!r}"
            )
        if (
            isinstance(self.polish_epochs, bool)
            or not isinstance(self.polish_epochs, int)
            or self.polish_epochs < 0
        ):
            raise ValueError(f"FusionConfig.polish_epochs must be an int >= 0, got {self.polish_epochs!r}")
        if not (
            isinstance(self.class_weight_sharpness, (int, float))
            and 0 < self.class_weight_sharpness < math.inf
        ):
            raise ValueError(
                "FusionConfig.class_weight_sharpness must be a positive number, "
                f"got {self.class_weight_sharpness!r}"
            )
        if not (isinstance(self.width_multiplier, (int, float)) and 0 < self.width_multiplier < math.inf):
            raise ValueError(
                f"FusionConfig.width_multiplier must be a positive number, got {self.width_multiplier!r}"
            )
        if self.grouping == "index" and self.width_multiplier != 1:
            raise ValueError(
                "FusionConfig.grouping='index' keeps the parents' width (neuron j of each makes fused "
                f"neuron j); got width_multiplier={self.width_multiplier!r}. Use 'kmeans'"
            )
        if not (isinstance(self.grouping_variance, (int, float)) and 0 < self.grouping_variance <= 1):
            raise ValueError(
                f"FusionConfig.grouping_variance must be in (0, 1], got {self.grouping_variance!r}"
            )
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction < 1):
            raise ValueError(
                f"FusionConfig.validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FusionConfig.seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"FusionConfig.progress must be a bool, got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"FusionConfig.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"FusionConfig.{name} must be a positive int, got {value!r}")
