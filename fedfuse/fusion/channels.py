"""Which tensors carry which neurons: channel spaces propagated through a traced model.

Every Linear or convolution (with the BatchNorm directly after it folded in), and every embedding of the
input's token ids, makes a new **space** of neurons: its output channels. Fusion groups a space's neurons
across parents; the order of the groups is free, as long as everything that carries the space agrees on
it. So this pass follows each space through the graph, run on an example input
(`torch.fx.Interpreter`): an activation or pooling keeps the channels where they are, a flatten spreads
each channel over a block of positions, an addition of two spaces (a residual connection) or a depthwise
convolution joins them into one **stream** that must share one grouping, a concatenation along the
channels puts spaces side by side (`Concatenated`), and the model's output ties its space to fixed
indices (the classes). Each rule is data in a table below (`PRESERVING_FUNCTIONS`,
`RESHAPING_METHODS`, ...), as in `torch.fx` passes that keep their patterns as data.

What no rule covers, on a tensor that carries a free space (an attention product, a channel slice, a
parameter used outside a layer, a LayerNorm), is **opaque**: the closed-form fit cannot handle it, and the
gradient variant fits the region around it as one block (`fedfuse.fusion.levels`).

The idea of propagating channel axes through an fx interpreter with per-operation handlers is the one
PLeaS (Nasery et al., 2025; SewoongLab/PLeaS-Merging, ``compiler.py``) uses to build permutation specs;
this is a separate implementation with fusion's own rules (streams, folding, fixed spaces, opaque regions).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: The space of the model's input and output: channels that keep their index in every parent.
FIXED = 0


@dataclass(frozen=True)
class Channels:
    """A tensor whose ``axis`` holds the channels of ``space``, channel-major: channel c occupies
    indices ``[c · positions, (c + 1) · positions)`` (``positions`` > 1 after a flatten)."""

    space: int
    axis: int
    positions: int = 1


@dataclass(frozen=True)
class Concatenated:
    """A tensor whose ``axis`` holds the channels of several spaces one after another (a concatenation
    along the channels, Inception's branches or DenseNet's features): ``parts`` gives each space (`FIXED`
    for channels that keep their index, such as the model's input) and its channels, in order;
    channel-major, ``positions`` entries per channel (after a flatten). Each space keeps its own grouping,
    and a layer reading the whole maps its inputs through each part's."""

    parts: tuple[tuple[int, int], ...]
    axis: int
    positions: int = 1

    @property
    def width(self) -> int:
        return sum(width for _, width in self.parts)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: A tensor made from parameters alone (a class token, a position embedding): its channels follow the
#: tensor it is combined with.
TIED = _Marker("TIED")
#: A tensor whose channel layout the rules cannot tell (the output of an opaque operation).
UNKNOWN = _Marker("UNKNOWN")

#: What the pass knows of a value: `Channels`, `Concatenated`, `TIED`, `UNKNOWN`, or None (no free
#: channels: it is made from the input and constants only, or it is not a tensor).
Annotation = Channels | Concatenated | _Marker | None
#: The annotations that carry neurons along an axis.
CARRYING = (Channels, Concatenated)

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)

# --- rules, as data -------------------------------------------------------------------------------------
# Channels stay on their axis, values are transformed entry by entry (or permutation-equivariantly).
PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax,
)  # fmt: skip
PRESERVING_FUNCTIONS: frozenset[Callable] = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize, torch.abs, torch.square,
    torch.exp, operator.neg, operator.pos, torch.clamp, torch.clip,
})  # fmt: skip
PRESERVING_METHODS: frozenset[str] = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clone", "contiguous", "float", "double",
    "half", "to", "type_as", "detach", "abs", "square", "exp", "softmax", "log_softmax", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "neg",
})  # fmt: skip
# Channels stay on axis 1 of [N, C, ...]; the positions after it are pooled.
POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.MaxPool3d,
    nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
# Padding of the last 1, 2 or 3 axes: channels stay where they are, as for pooling, when they are not
# among the padded axes (a 1-d padding of [N, C] pads the channels).
PADDING_MODULES: dict[type[nn.Module], int] = {
    nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3, nn.ReplicationPad1d: 1,
    nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3, nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3,
    nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3, nn.CircularPad1d: 1,
    nn.CircularPad2d: 2, nn.CircularPad3d: 3,
}  # fmt: skip
POOLING_FUNCTIONS: frozenset[Callable] = frozenset({
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.lp_pool1d, F.lp_pool2d, F.interpolate,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
})  # fmt: skip
# Memory order kept, shape changed: where the channels go is read off the shapes.
RESHAPING_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)
RESHAPING_FUNCTIONS: frozenset[Callable] = frozenset(
    {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
)
RESHAPING_METHODS: frozenset[str] = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze"})
# Layers called as functions with the model's own weights (``F.conv2d(x, self.weight, self.bias)``, a
# MAML-style learner): each makes a new space of its output channels, on this axis, which only the
# gradient variant fits (no module holds the weights for the closed form).
FUNCTIONAL_LAYERS: dict[Callable, int] = {
    F.linear: -1, F.bilinear: -1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.conv_transpose1d: 1,
    F.conv_transpose2d: 1, F.conv_transpose3d: 1, torch.conv1d: 1, torch.conv2d: 1, torch.conv3d: 1,
}  # fmt: skip
# Reductions over the axes given by ``dim`` (the channel axis must not be one of them).
REDUCING_FUNCTIONS: frozenset[Callable] = frozenset(
    {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp}
)
REDUCING_METHODS: frozenset[str] = frozenset({"mean", "sum", "amax", "amin", "std", "var", "logsumexp"})
# A power with a constant exponent (``h ** 2``): element-wise, like ``torch.square``.
POWER_FUNCTIONS: frozenset[Callable] = frozenset({operator.pow, torch.pow})
# torch.max / torch.min: with ``dim``, a reduction that returns ``(values, indices)``; with a second
# tensor, an element-wise operation.
EXTREMA_FUNCTIONS: frozenset[Callable] = frozenset({torch.max, torch.min})
EXTREMA_METHODS: frozenset[str] = frozenset({"max", "min"})
# Modules with per-channel parameters (or none) that keep the channels on their axis (-1: the last),
# with the attribute (or function) giving how many channels they hold: levels of their own, affine in
# their parameters (`fedfuse.fusion.per_channel`). A GroupNorm normalises groups of neighbouring channels,
# which stay whole as the fused channels come in the reference parent's order; a layer norm over several
# axes is not here: its parameters are per position.
CHANNEL_PARAMETERS: dict[type[nn.Module], tuple[int, str | Callable[[nn.Module], int]]] = {
    nn.LayerNorm: (
        -1,
        lambda module: module.normalized_shape[0] if len(module.normalized_shape) == 1 else -1,
    ),
    nn.GroupNorm: (1, "num_channels"),
    nn.PReLU: (1, "num_parameters"),
    nn.InstanceNorm1d: (1, "num_features"),
    nn.InstanceNorm2d: (1, "num_features"),
}
# Blocks whose output width a module declares other than by ``out_channels`` / ``out_features``: attention
# and transformer layers, whose outputs hold their model width on the last axis (tokens before it).
FEATURE_WIDTHS: dict[type[nn.Module], Callable[[nn.Module], int]] = {
    nn.MultiheadAttention: lambda module: module.embed_dim,
    nn.TransformerEncoderLayer: lambda module: module.self_attn.embed_dim,
    nn.TransformerDecoderLayer: lambda module: module.self_attn.embed_dim,
    nn.TransformerEncoder: lambda module: module.layers[0].self_attn.embed_dim,
    nn.TransformerDecoder: lambda module: module.layers[0].self_attn.embed_dim,
    nn.Transformer: lambda module: module.d_model,
}
# Attributes of a tensor that are the same tensor.
SAME_TENSOR_ATTRIBUTES: frozenset[str] = frozenset({"data"})
# Element-wise binary operations, with broadcasting.
JOINING_FUNCTIONS: frozenset[Callable] = frozenset({
    operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, operator.mul,
    operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, torch.maximum, torch.minimum,
})  # fmt: skip
JOINING_METHODS: frozenset[str] = frozenset({
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
})  # fmt: skip
#: The binary operations whose result is a sum: a level that feeds one directly can be fitted to the
#: sum's target minus the other terms (a residual connection).
SUMS: frozenset[Any] = frozenset({operator.add, operator.iadd, torch.add, "add", "add_"})
# Operations that move axes around without touching values.
AXIS_METHODS: frozenset[str] = frozenset({"permute", "transpose", "expand", "expand_as", "repeat"})
AXIS_FUNCTIONS: frozenset[Callable] = frozenset({torch.permute, torch.transpose})
# Operations that return no tensor (shape queries) and so carry nothing.
SHAPE_METHODS: frozenset[str] = frozenset({"size", "dim", "numel"})
# Attributes of a tensor that describe it without its values.
METADATA: frozenset[str] = frozenset({"shape", "ndim", "device", "dtype"})


@dataclass
class LayerCall:
    """A Linear/convolution call that can be a level of its own, with the BatchNorm folded into it.

    Attributes:
        node: the layer's graph node.  module: its qualified module name.
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"depthwise1d"``, ``"depthwise2d"``,
            ``"embedding"`` or ``"per_channel"`` (a module with per-channel parameters, `CHANNEL_PARAMETERS`).
        width: output channels.
        space: the space its output channels make (before streams are joined).
        input: the annotation of the layer's input (for re-indexing weights through a grouping).
        norm_node, norm: the folded BatchNorm's node and module name, if any.
    """

    node: str
    module: str
    kind: str
    width: int
    space: int
    input: Annotation
    norm_node: str | None = None
    norm: str | None = None

    @property
    def output_node(self) -> str:
        return self.norm_node or self.node


@dataclass
class ChannelMap:
    """The result of the pass over one traced model.

    Attributes:
        annotations: per node name, what its value carries.
        shapes: per tensor-valued node name, the value's shape on the example input.
        layers: per layer node name, the `LayerCall`.
        opaque: per node name, why the closed-form fit cannot handle that node.
        parents: the union-find forest of spaces (`find` gives a space's stream).
        widths: per space, its number of channels.
        outputs: the spaces that reach the model's output (its classes), before they were fixed.
        fixed_because: per space fixed by a rule, why (`fix`).
    """

    annotations: dict[str, Annotation] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layers: dict[str, LayerCall] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)
    parents: dict[int, int] = field(default_factory=lambda: {FIXED: FIXED})
    widths: dict[int, int] = field(default_factory=dict)
    outputs: set[int] = field(default_factory=set)
    fixed_because: dict[int, str] = field(default_factory=dict)

    def new_space(self, width: int) -> int:
        space = len(self.parents)
        self.parents[space] = space
        self.widths[space] = width
        return space

    def find(self, space: int) -> int:
        while self.parents[space] != space:
            self.parents[space] = self.parents[self.parents[space]]
            space = self.parents[space]
        return space

    def join(self, first: int, second: int) -> int:
        """One stream of both; a stream joined with `FIXED` is fixed."""
        a, b = self.find(first), self.find(second)
        if a == b:
            return a
        keep, drop = (a, b) if a < b else (b, a)  # FIXED = 0 always wins
        self.parents[drop] = keep
        return keep

    def fix(self, space: int, reason: str) -> int:
        """Fix ``space``'s stream (`join` it with `FIXED`), remembering why for each of its spaces."""
        stream = self.find(space)
        for member in self.parents:
            if member != FIXED and self.find(member) == stream:
                self.fixed_because.setdefault(member, reason)
        return self.join(stream, FIXED)

    def fixed(self, space: int) -> bool:
        return self.find(space) == FIXED


def propagate(graph_module: fx.GraphModule, example: Tensor) -> ChannelMap:
    """Run ``graph_module`` on ``example`` and annotate every node with the channels it carries."""
    propagation = _Propagation(graph_module)
    with torch.no_grad():
        propagation.run(example)
    return propagation.map


class _Propagation(fx.Interpreter):
    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.map = ChannelMap()
        self.users = {node.name: len(node.users) for node in graph_module.graph.nodes}
        # What the first of each pair carries: the values of a max or min over an axis (values, indices),
        # the outputs of a recurrent layer (outputs, state).
        self.pairs: dict[str, tuple[Annotation, Annotation | str]] = {}

    # -- fx.Interpreter hooks ------------------------------------------------------------------------------
    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if isinstance(value, Tensor):
            self.map.shapes[node.name] = tuple(value.shape)
        annotation = self._annotate(node, value)
        if isinstance(annotation, CARRYING) and not isinstance(value, Tensor):
            annotation = UNKNOWN  # e.g. the chunks of a tensor of neurons, as one tuple
        self.map.annotations[node.name] = annotation
        return value

    # -- rules -----------------------------------------------------------------------------------------------
    def _annotate(self, node: fx.Node, value: Any) -> Annotation:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return TIED if isinstance(self.fetch_attr(str(node.target)), nn.Parameter) else None
        if node.op == "output":
            self._tie_output(node)
            return None
        inputs = [self.map.annotations.get(arg.name) for arg in node.all_input_nodes]
        target = node.target
        method = target if node.op == "call_method" else None
        function = target if node.op == "call_function" else None
        if (
            function in (getattr, operator.getitem)
            and isinstance(node.args[0], fx.Node)
            and node.args[0].name in self.pairs
        ):
            return self._pair_part(node, value)
        if method in SHAPE_METHODS:
            return None
        if function is getattr:
            return self._attribute(node, value)
        if node.op == "call_module":
            return self._module(node, self.fetch_attr(str(node.target)), value)
        if function in FUNCTIONAL_LAYERS and isinstance(value, Tensor) and value.dim() >= 2:
            return self._functional_layer(node, function, value)
        if not any(isinstance(a, CARRYING) or a is UNKNOWN for a in inputs):
            # Made from the input, constants and parameters only: no free channels to follow.
            return TIED if any(a is TIED for a in inputs) else None
        if any(a is UNKNOWN for a in inputs):
            return UNKNOWN
        if function is torch.cat or function is torch.concat:
            return self._concatenated(node, value)
        if any(isinstance(a, Concatenated) for a in inputs) and not (
            function in PRESERVING_FUNCTIONS
            or method in PRESERVING_METHODS
            or function in POOLING_FUNCTIONS
            or function in RESHAPING_FUNCTIONS
            or method in RESHAPING_METHODS
            or function in REDUCING_FUNCTIONS
            or method in REDUCING_METHODS
            or function in AXIS_FUNCTIONS
            or method in AXIS_METHODS
        ):
            name = getattr(target, "__name__", str(target))
            return self._opaque(node, f"{name}() on concatenated channels: fusion has no rule for it")
        if function in PRESERVING_FUNCTIONS or method in PRESERVING_METHODS:
            return self._first(node)
        if (function in POWER_FUNCTIONS or method == "pow") and _constant_exponent(node):
            return self._first(node)
        if function is F.pad and isinstance(value, Tensor):
            return self._padded(node, value)
        if function in POOLING_FUNCTIONS:
            return self._pooled(node, self._first(node), value)
        if function in RESHAPING_FUNCTIONS or method in RESHAPING_METHODS:
            return self._reshaped(node, self._first(node), self._arg_shape(node), value)
        if function in REDUCING_FUNCTIONS or method in REDUCING_METHODS:
            return self._reduced(node, value)
        if function in EXTREMA_FUNCTIONS or method in EXTREMA_METHODS:
            return self._extremum(node, value)
        if function in JOINING_FUNCTIONS or method in JOINING_METHODS:
            return self._joined(node, value)
        if function is operator.getitem:
            return self._indexed(node, value)
        if function in AXIS_FUNCTIONS or method in AXIS_METHODS:
            return self._moved(node, value)
        name = getattr(target, "__name__", str(target))
        return self._opaque(node, f"{name}() on neurons: fusion has no rule for how it treats channels")

    def _module(self, node: fx.Node, module: nn.Module, value: Any) -> Annotation:
        source = self.map.annotations.get(node.all_input_nodes[0].name) if node.all_input_nodes else None
        name = str(node.target)
        if isinstance(module, LAYERS) and plain_forward(module):
            return self._layer(node, name, module, source, value)
        if isinstance(module, nn.Embedding) and plain_forward(module) and module.max_norm is None:
            return self._embedding(node, name, module, source, value)
        if isinstance(module, _BatchNorm) and plain_forward(module):
            return self._batchnorm(node, name, module, source)
        if plain_forward(module) and _keeps_channels(module, source, value):
            # Without affine parameters a norm only transforms channels in place: nothing to fit.
            return self._per_channel(node, name, source) if any(True for _ in module.parameters()) else source
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.parameters()):
            kind = type(module).__name__
            self._opaque(
                node, f"module '{name}' ({kind}) holds parameters that only the gradient variant fits"
            )
            if isinstance(module, nn.RNNBase) and isinstance(value, tuple) and isinstance(value[0], Tensor):
                return self._recurrent(node, value)
            if isinstance(module, nn.MultiheadAttention) and isinstance(value, tuple):
                return self._attention(node, module, value)
            if _norm_over_channels_and_positions(module, source, value):
                return source  # channel c stays channel c: the block's neurons are its input's
            produced = _declared_channels(module, value)
            return UNKNOWN if produced is None else Channels(self.map.new_space(produced[1]), produced[0])
        if not isinstance(source, CARRYING):
            return source if source in (None, TIED) else UNKNOWN
        if isinstance(module, PRESERVING_MODULES):
            return source
        if isinstance(module, POOLING_MODULES):
            return self._pooled(node, source, value)
        padded = next((axes for kind, axes in PADDING_MODULES.items() if isinstance(module, kind)), None)
        if padded is not None and isinstance(value, Tensor) and value.dim() - padded >= 2:
            return self._pooled(node, source, value)
        if isinstance(module, RESHAPING_MODULES):
            return self._reshaped(node, source, self._arg_shape(node), value)
        return self._opaque(
            node, f"module '{name}' ({type(module).__name__}): fusion has no rule for how it treats channels"
        )

    def _layer(
        self, node: fx.Node, name: str, module: nn.Module, source: Annotation, value: Tensor
    ) -> Annotation:
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if isinstance(source, CARRYING) and source.axis != 1:
                return self._opaque(node, f"convolution '{name}' takes channels on axis {source.axis}, not 1")
            if isinstance(source, Concatenated) and (is_depthwise(module) or source.positions != 1):
                return self._opaque(node, f"convolution '{name}' reads concatenated channels it cannot map")
            if is_depthwise(module):
                return self._depthwise(node, name, module, source, value)
            if module.groups != 1:
                return self._opaque(
                    node,
                    f"convolution '{name}' has groups={module.groups}; only groups=1 and depthwise "
                    "(groups = in_channels = out_channels) are fitted",
                )
            kind, axis, width = f"conv{value.dim() - 2}d", 1, module.out_channels
        else:
            kind, axis, width = "linear", value.dim() - 1, module.out_features
            if isinstance(source, CARRYING) and source.axis != value.dim() - 1:
                return self._opaque(
                    node, f"Linear '{name}' maps along an axis that does not hold the channels"
                )
        space = self.map.new_space(width)
        self.map.layers[node.name] = LayerCall(node.name, name, kind, width, space, source)
        return Channels(space, axis)

    def _depthwise(
        self, node: fx.Node, name: str, module: nn.Module, source: Annotation, value: Tensor
    ) -> Annotation:
        """A depthwise convolution: output channel c reads input channel c alone, so its channels are its
        input's, in one stream with them (grouped once, like the two sides of a sum)."""
        if isinstance(source, Channels) and source.positions != 1:
            return self._opaque(node, f"depthwise convolution '{name}' reads channels spread over positions")
        space = self.map.new_space(module.out_channels)
        if isinstance(source, Channels):
            self.map.join(space, source.space)
        else:  # the model's input (or constants): its channels keep their index
            self.map.fix(space, f"depthwise convolution '{name}' reads the model's input channels")
        kind = f"depthwise{value.dim() - 2}d"
        self.map.layers[node.name] = LayerCall(node.name, name, kind, module.out_channels, space, source)
        return Channels(space, 1)

    def _per_channel(self, node: fx.Node, name: str, source: Annotation) -> Annotation:
        """A module with per-channel parameters (a LayerNorm, GroupNorm, InstanceNorm, PReLU): a level of
        its own whose channels are its input's, in one stream with them, like a depthwise convolution's."""
        assert isinstance(source, Channels)
        width = self.map.widths[source.space]
        space = self.map.join(self.map.new_space(width), source.space)
        self.map.layers[node.name] = LayerCall(node.name, name, "per_channel", width, space, source)
        return source

    def _embedding(
        self, node: fx.Node, name: str, module: nn.Embedding, source: Annotation, value: Tensor
    ) -> Annotation:
        """An embedding of token ids from the input: its neurons are the embedding's dimensions (the last
        axis of its output), a space of their own."""
        if source is not None:
            return self._opaque(node, f"embedding '{name}' looks up ids computed from neurons")
        if not _reads_input_values(node.all_input_nodes[0]):
            return self._opaque(
                node,
                f"module '{name}' (Embedding) looks up ids that are not the input's (positions, say): its "
                "table is a parameter added to the stream, which only the gradient variant fits",
            )
        space = self.map.new_space(module.embedding_dim)
        self.map.layers[node.name] = LayerCall(
            node.name, name, "embedding", module.embedding_dim, space, None
        )
        return Channels(space, value.dim() - 1)

    def _batchnorm(self, node: fx.Node, name: str, module: _BatchNorm, source: Annotation) -> Annotation:
        if not module.track_running_stats:
            self._opaque(
                node,
                f"BatchNorm '{name}' keeps no running statistics, so in eval mode it depends on the batch "
                "and is not an affine map that can be folded",
            )
            return source
        producer = node.all_input_nodes[0]
        layer = self.map.layers.get(producer.name)
        if layer is None or self.users[producer.name] != 1 or layer.norm is not None:
            if _norm_of_channels(module, source):
                # In eval mode a per-channel affine map of its input: a level of its own, like a
                # LayerNorm's (after a ReLU, a sum: pre-activation ResNets).
                return self._per_channel(node, name, source)
            self._opaque(
                node,
                f"BatchNorm '{name}' does not directly follow a Linear/Conv layer whose only use it is, "
                "nor normalises the traced channels of its input's axis 1: no closed form fits it",
            )
            return source
        if not isinstance(source, Channels) or source.axis != 1 or module.num_features != layer.width:
            self._opaque(node, f"BatchNorm '{name}' does not normalise the channels of '{layer.module}'")
            return source
        layer.norm_node, layer.norm = node.name, name
        return source

    def _tie_output(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            annotation = self._output_annotation(arg)
            if isinstance(annotation, Concatenated):
                raise ValueError(
                    "the model's output concatenates the outputs of several layers; fusion needs one layer "
                    "that outputs the classes"
                )
            if isinstance(annotation, Channels):
                stream = self.map.find(annotation.space)
                self.map.outputs |= {space for space in self.map.parents if self.map.find(space) == stream}
                self.map.join(stream, FIXED)

    def _output_annotation(self, node: fx.Node) -> Annotation:
        """What the model's output carries. One output neuron reshaped away (a regression value or a
        binary logit returned by ``.squeeze(-1)`` or ``.view(-1)``) is still that neuron: an output no rule
        follows is traced back through operations of one input to a space of width 1."""
        output = annotation = self.map.annotations.get(node.name)
        while annotation is UNKNOWN and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
            annotation = self.map.annotations.get(node.name)
        if isinstance(annotation, Channels) and self.map.widths[annotation.space] == 1:
            return annotation
        return output

    def _first(self, node: fx.Node) -> Annotation:
        return self.map.annotations.get(node.all_input_nodes[0].name)

    def _arg_shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.map.shapes[node.all_input_nodes[0].name]

    def _padded(self, node: fx.Node, value: Tensor) -> Annotation:
        """``F.pad(x, pad)`` pads the last ``len(pad) / 2`` axes: the channels stay where they are when
        they are not among them, as for the padding modules."""
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        if isinstance(pad, (tuple, list)) and value.dim() - len(pad) // 2 >= 2:
            return self._pooled(node, self._first(node), value)
        return self._opaque(node, "a padding of the axis that holds the channels")

    def _functional_layer(self, node: fx.Node, function: Callable, value: Tensor) -> Annotation:
        """A layer called as a function: a new space of its output channels when it reads a weight of the
        model's own (a parameter), fitted as a block; otherwise (weights computed from the input, an
        attention product say) an operation with no rule."""
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = getattr(function, "__name__", str(function))
        if not (isinstance(weight, fx.Node) and self.map.annotations.get(weight.name) is TIED):
            return self._opaque(node, f"{name}() with weights that are no parameter: fusion has no rule")
        self._opaque(node, f"{name}() called with the model's own weights: only the gradient variant fits it")
        axis = FUNCTIONAL_LAYERS[function] % value.dim()
        return Channels(self.map.new_space(value.shape[axis]), axis)

    def _opaque(self, node: fx.Node, reason: str) -> Annotation:
        self.map.opaque.setdefault(node.name, reason)
        return UNKNOWN

    def _pooled(self, node: fx.Node, source: Annotation, value: Tensor) -> Annotation:
        if isinstance(source, CARRYING) and (source.axis != 1 or source.positions != 1):
            return self._opaque(node, "pooling over an axis that holds channels")
        return source

    def _reshaped(
        self, node: fx.Node, source: Annotation, shape: tuple[int, ...], value: Tensor
    ) -> Annotation:
        if not isinstance(source, CARRYING):
            return source
        width = source.width if isinstance(source, Concatenated) else self.map.widths[source.space]
        moved = _reshape_channels(source.axis, source.positions, shape, tuple(value.shape), width)
        if moved is None:
            return self._opaque(node, f"a reshape {shape} -> {tuple(value.shape)} that splits channels apart")
        return replace(source, axis=moved[0], positions=moved[1])

    def _reduced(self, node: fx.Node, value: Tensor) -> Annotation:
        source = self._first(node)
        assert isinstance(source, CARRYING)
        shape = self._arg_shape(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = isinstance(value, Tensor) and value.dim() == len(shape)  # whatever the arguments' order
        if dims is None:
            return self._opaque(node, "a reduction over every axis, channels included")
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if source.axis in dims:
            return self._opaque(node, "a reduction over the axis that holds the channels")
        axis = source.axis if keepdim else source.axis - sum(d < source.axis for d in dims)
        return replace(source, axis=axis)

    def _extremum(self, node: fx.Node, value: Any) -> Annotation:
        """``torch.max(x, other)`` is element-wise; ``torch.max(x, dim)`` a reduction whose values (read
        by ``.values`` or ``[0]``, `_pair_part`) keep the channels, like ``amax``; a max over every
        axis mixes them."""
        other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
        if isinstance(other, fx.Node):
            return self._joined(node, value)
        if isinstance(value, Tensor):
            return self._opaque(node, "a reduction over every axis, channels included")
        self.pairs[node.name] = (self._reduced(node, value[0]), "the positions of a max or min over neurons")
        return UNKNOWN  # a pair is no tensor of neurons; its values are

    def _recurrent(self, node: fx.Node, value: tuple) -> Annotation:
        """A recurrent layer's ``(outputs, state)``: the outputs' last axis holds the hidden units of its
        last layer, the state's (``h`` ``[layers · directions, N, H]``, or an LSTM's ``(h, c)``) the
        final hidden units of each layer, a space of their own (``h[-1]`` is not the outputs' units for a
        bidirectional layer). Either is a block's output whose neurons can be told apart."""
        outputs, state = value
        first = Channels(self.map.new_space(outputs.shape[-1]), outputs.dim() - 1)
        hidden = state[0] if isinstance(state, tuple) else state
        second: Annotation | str = Channels(self.map.new_space(hidden.shape[-1]), hidden.dim() - 1)
        if isinstance(state, tuple):  # (h, c): read by a second index
            self.pairs[f"{node.name}:state"] = (second, "an LSTM's cell state")
            second = f"{node.name}:state"
        self.pairs[node.name] = (first, second)
        return UNKNOWN

    def _attention(self, node: fx.Node, module: nn.MultiheadAttention, value: tuple) -> Annotation:
        """``MultiheadAttention``'s ``(outputs, weights)``: the outputs' last axis holds ``embed_dim``
        neurons of a space of their own; the weights (per pair of tokens) hold none."""
        outputs = value[0]
        produced = _declared_channels(module, outputs)
        first = UNKNOWN if produced is None else Channels(self.map.new_space(produced[1]), produced[0])
        self.pairs[node.name] = (first, "attention weights")
        return UNKNOWN

    def _pair_part(self, node: fx.Node, value: Any) -> Annotation:
        """A part of a pair (`pairs`): its annotation, a nested pair, or why it carries no known neurons."""
        first, second = self.pairs[node.args[0].name]
        part = node.args[1]
        chosen = first if part in ("values", 0) else second if part in ("indices", 1) else None
        if isinstance(chosen, str) and chosen in self.pairs:
            self.pairs[node.name] = self.pairs[chosen]
            return UNKNOWN
        if isinstance(chosen, str):
            return self._opaque(node, chosen)
        return chosen

    def _attribute(self, node: fx.Node, value: Any) -> Annotation:
        """A tensor's attribute: a shape, dtype or device carries nothing; the same tensor (``.data``)
        its channels; any other tensor (``.T``, ``.mT``, ``.real``) has no rule."""
        if not isinstance(value, Tensor):
            return None
        source = self._first(node)
        if source is None or source is TIED:
            return source
        if node.args[1] in SAME_TENSOR_ATTRIBUTES:
            return source
        return self._opaque(node, f"the attribute .{node.args[1]} of neurons: fusion has no rule for it")

    def _joined(self, node: fx.Node, value: Tensor) -> Annotation:
        """An element-wise operation: the operands' channels line up one to one, so their spaces are one.
        An operand of one neuron broadcast over every channel (an attention-pooling score ``w * h``, a
        gate) is no channel of theirs: its one neuron is matched by index, and it joins no space."""
        result: Channels | None = None
        broadcast: list[Channels] = []
        for arg in (*node.args, *node.kwargs.values()):
            if not isinstance(arg, fx.Node):
                continue  # a Python number broadcasts over every channel alike
            annotation = self.map.annotations.get(arg.name)
            shape = self.map.shapes.get(arg.name)
            if shape is None:
                continue
            offset = value.dim() - len(shape)
            if (
                isinstance(annotation, Channels)
                and shape[annotation.axis] == 1 < value.shape[annotation.axis + offset]
            ):
                broadcast.append(annotation)
                continue
            if isinstance(annotation, Channels):
                aligned = Channels(annotation.space, annotation.axis + offset, annotation.positions)
                if result is None:
                    result = aligned
                elif (aligned.axis, aligned.positions) != (result.axis, result.positions):
                    return self._opaque(node, "an element-wise operation on channels that do not line up")
                else:
                    result = Channels(
                        self.map.join(result.space, aligned.space), result.axis, result.positions
                    )
        if broadcast and (result is None or node.target in SUMS):
            return self._opaque(node, "a sum with one neuron broadcast over every channel")
        for annotation in broadcast:
            self.map.fix(annotation.space, "its one neuron scales every channel of another space")
        assert result is not None
        for arg in (*node.args, *node.kwargs.values()):
            if not isinstance(arg, fx.Node) or arg.name not in self.map.shapes:
                continue
            annotation, shape = self.map.annotations.get(arg.name), self.map.shapes[arg.name]
            axis = result.axis - (value.dim() - len(shape))
            if annotation is None and axis >= 0 and shape[axis] != 1:
                # A tensor of the input or constants, with one entry per channel: it ties each channel to
                # its index, the same in every parent.
                fixed = self.map.fix(
                    result.space,
                    "an element-wise operation with a constant per channel ties each to its index",
                )
                result = Channels(fixed, result.axis, result.positions)
        return result

    def _indexed(self, node: fx.Node, value: Any) -> Annotation:
        source = self._first(node)
        if not isinstance(value, Tensor) or not isinstance(source, Channels):
            return None if not isinstance(value, Tensor) else source
        index = node.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        shape = self._arg_shape(node)
        if any(isinstance(item, fx.Node) for item in items):
            return self._opaque(node, "indexing neurons by a tensor")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(shape) - sum(item is not None for item in items if item is not Ellipsis)
            items[at : at + 1] = [slice(None)] * fill
        axis_in = axis_out = 0
        for item in items:
            if item is None:
                axis_out += 1
                continue
            if axis_in == source.axis:
                if item != slice(None):
                    return self._opaque(node, "indexing that selects some channels and not others")
                return Channels(source.space, axis_out, source.positions)
            axis_out += 0 if isinstance(item, int) else 1
            axis_in += 1
        return Channels(source.space, axis_out + source.axis - axis_in, source.positions)

    def _concatenated(self, node: fx.Node, value: Tensor) -> Annotation:
        """Along the channels, the parts' spaces side by side (`Concatenated`); along another axis (a class
        token before the patch tokens), one stream of the parts' channels."""
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % value.dim()
        annotations = [self.map.annotations.get(arg.name) for arg in tensors]
        if any(isinstance(a, CARRYING) and a.axis == dim for a in annotations):
            return self._side_by_side(node, tensors, annotations, dim)
        result: Channels | None = None
        for arg in tensors:
            annotation = self.map.annotations.get(arg.name)
            if isinstance(annotation, Concatenated):
                return self._opaque(node, "a concatenation of concatenated channels along another axis")
            if isinstance(annotation, Channels):
                if result is None:
                    result = annotation
                elif (annotation.axis, annotation.positions) != (result.axis, result.positions):
                    return self._opaque(node, "a concatenation of channels that do not line up")
                else:
                    result = Channels(
                        self.map.join(result.space, annotation.space), result.axis, result.positions
                    )
            elif annotation is None:
                return self._opaque(node, "a concatenation of neurons with input-derived values")
        return result

    def _side_by_side(
        self, node: fx.Node, tensors: Any, annotations: list[Annotation], dim: int
    ) -> Annotation:
        parts: list[tuple[int, int]] = []
        for arg, annotation in zip(tensors, annotations):
            if isinstance(annotation, CARRYING) and (annotation.axis, annotation.positions) == (dim, 1):
                parts += (
                    annotation.parts
                    if isinstance(annotation, Concatenated)
                    else ((annotation.space, self.map.shapes[arg.name][dim]),)
                )
            elif annotation is None:  # the model's input or constants: channels that keep their index
                parts.append((FIXED, self.map.shapes[arg.name][dim]))
            else:
                return self._opaque(node, "a concatenation along the channels of tensors that do not line up")
        return Concatenated(tuple(parts), dim)

    def _moved(self, node: fx.Node, value: Tensor) -> Annotation:
        source = self._first(node)
        assert isinstance(source, CARRYING)
        shape = self._arg_shape(node)
        name = node.target if isinstance(node.target, str) else node.target.__name__
        arguments = node.args[1:]
        if name == "permute":
            order = (
                arguments[0] if len(arguments) == 1 and isinstance(arguments[0], (tuple, list)) else arguments
            )
            order = [d % len(shape) for d in order]
            return replace(source, axis=order.index(source.axis))
        if name == "transpose":
            a, b = (d % len(shape) for d in arguments[:2])
            axis = b if source.axis == a else a if source.axis == b else source.axis
            return replace(source, axis=axis)
        offset = value.dim() - len(shape)  # expand/repeat may prepend axes
        if value.shape[source.axis + offset] != shape[source.axis]:
            return self._opaque(node, f"{name}() along the axis that holds the channels")
        return replace(source, axis=source.axis + offset)


def _reshape_channels(
    axis: int, positions: int, before: tuple[int, ...], after: tuple[int, ...], width: int
) -> tuple[int, int] | None:
    """Where a reshape (memory order kept) puts the channels, or None when they no longer lie along one
    axis, channel-major. Channel c covers flat indices with (f // (positions · S)) % width == c, S being
    the size of the axes after the channel axis; it lies along output axis j when the axes after j (size
    T) divide positions · S and axis j holds width · (positions · S / T) entries."""
    span = positions * math.prod(before[axis + 1 :])
    for new_axis in range(len(after)):
        tail = math.prod(after[new_axis + 1 :])
        if span % tail == 0 and after[new_axis] * tail == width * span and after[new_axis] > 0:
            return new_axis, span // tail
    return None


def _constant_exponent(node: fx.Node) -> bool:
    """Whether a power's exponent is a number (not a tensor), and its base the tensor."""
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    return isinstance(node.args[0], fx.Node) and isinstance(exponent, (int, float))


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution: one filter per channel, each reading its own channel
    (``groups = in_channels = out_channels``; a channel multiplier above 1 is not one)."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _reads_input_values(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on the model input's values, not only on its shape (``size()``,
    ``.shape``, ``.device``: ``torch.arange(x.shape[1])`` reads none)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        if current.op == "call_method" and current.target in SHAPE_METHODS:
            continue
        if current.op == "call_function" and current.target is getattr and current.args[1] in METADATA:
            continue
        stack.extend(current.all_input_nodes)
    return False


def plain_forward(module: nn.Module) -> bool:
    """Whether ``module`` computes what its torch.nn class does (a subclass may override forward)."""
    for base in (*LAYERS, nn.Embedding, _BatchNorm, *CHANNEL_PARAMETERS):
        if isinstance(module, base):
            return type(module).forward is next(
                cls.forward for cls in type(module).__mro__ if cls.__module__.startswith("torch.nn")
            )
    return False


def _declared_channels(module: nn.Module, value: Any) -> tuple[int, int] | None:
    """(axis, width) of the channels a module with parameters and no rule says it outputs: a convolution
    fusion does not fit in closed form (``Conv3d``, ``ConvTranspose2d``: ``out_channels`` on axis 1), a
    Linear-like module (``out_features`` on the last axis) or an attention or transformer layer
    (`FEATURE_WIDTHS`). Its block's neurons can then be told apart."""
    if not isinstance(value, Tensor) or value.dim() < 2:
        return None
    channels, features = getattr(module, "out_channels", None), getattr(module, "out_features", None)
    for kind, width in FEATURE_WIDTHS.items():
        if isinstance(module, kind):
            features = width(module)
    if isinstance(channels, int) and value.dim() >= 3 and value.shape[1] == channels:
        return 1, channels
    if isinstance(features, int) and value.shape[-1] == features:
        return value.dim() - 1, features
    return None


def _norm_over_channels_and_positions(module: nn.Module, source: Annotation, value: Any) -> bool:
    """Whether ``module`` is a LayerNorm over the channels and every axis after them (``nn.LayerNorm([C,
    H, W])`` on ``[N, C, H, W]``): its statistics mix no channel's identity, and its parameters, one per
    channel and position, keep channel c at c. Not fitted in closed form (they are per position), it is a
    block whose output neurons are its input's."""
    if not (isinstance(module, nn.LayerNorm) and plain_forward(module) and isinstance(value, Tensor)):
        return False
    if not isinstance(source, Channels) or source.positions != 1:
        return False
    shape = tuple(module.normalized_shape)
    return (
        len(shape) > 1
        and source.axis == value.dim() - len(shape)
        and tuple(value.shape[source.axis :]) == shape
    )


def _norm_of_channels(module: _BatchNorm, source: Annotation) -> bool:
    """Whether a BatchNorm (with running statistics) that follows no layer is an affine map of its input's
    channels, channel by channel: affine, its channels traced ones on axis 1."""
    return module.affine and isinstance(source, Channels) and source.axis == 1 and source.positions == 1


def _keeps_channels(module: nn.Module, source: Annotation, value: Any) -> bool:
    """Whether a module with parameters keeps its input's channels where they were, channel c of its
    output being channel c of its input transformed with channel c's parameters (`CHANNEL_PARAMETERS`),
    and any statistics it normalises by taken over channels in order (a GroupNorm's groups)."""
    if not isinstance(source, Channels) or source.positions != 1 or not isinstance(value, Tensor):
        return False
    for kind, (axis, count) in CHANNEL_PARAMETERS.items():
        if isinstance(module, kind):
            width = getattr(module, count) if isinstance(count, str) else count(module)
            if isinstance(module, nn.PReLU) and width == 1:
                return True  # one slope for every channel, wherever they are
            at = value.dim() - 1 if axis == -1 else axis
            return source.axis == at and value.shape[at] == width
    return False
