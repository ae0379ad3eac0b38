"""Levels: the units that fusion groups and fits one after another, found by tracing the model.

A **level** is a module (or block) whose output holds a set of neurons: a Linear or convolution, with the
BatchNorm directly after it folded in (in eval mode a BatchNorm is an affine map), or, where the model
does something the closed-form fit cannot follow (attention, a LayerNorm, a parameter used outside a
layer), a **block**: the whole region between two points where one tensor carries everything forward.
Its input and output are read where the model computes them, and its neurons live in a **space**: its
own output channels, or a residual **stream** shared with every level whose output is added to it (so
they share one grouping). Fixed spaces keep each channel's index in every parent: the classes.

Levels are found by tracing the model (`fedfuse.fusion.tracing`, `fedfuse.fusion.channels`), whatever
its class; a model may instead declare them (`fedfuse.fusion.declared`), and then its levels are read
with hooks on the declared modules, which works for models that cannot be traced.

A level that adds into a residual connection directly (``bn2(conv2(x)) + shortcut(x)``) is fitted last
among the terms of that sum, to the sum's group target minus the fused model's other terms: each
convolution of a residual block keeps its closed-form fit, and the block computes the stream's target.

`plan_levels` builds the `LevelPlan` of a model; `describe_levels` prints it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, fx, nn

from fedfuse.fusion.channels import (
    FIXED,
    LAYERS,
    SUMS,
    TIED,
    UNKNOWN,
    Annotation,
    ChannelMap,
    Channels,
    Concatenated,
    LayerCall,
    plain_forward,
    propagate,
)
from fedfuse.fusion.declared import LevelSpec, declared_levels
from fedfuse.fusion.parametrized import copied, without_parametrizations
from fedfuse.fusion.tracing import input_node, output_node, trace

#: The kinds of level the closed-form (linear) variant fits.
LAYER_KINDS = ("linear", "conv1d", "conv2d", "depthwise1d", "depthwise2d", "embedding", "per_channel")
#: Layers whose neuron c reads input channel c alone: fitted channel by channel, in their input's stream.
CHANNELWISE_KINDS = ("depthwise1d", "depthwise2d")


@dataclass(frozen=True)
class Level:
    """One level of a model.

    Attributes:
        name: the level's name in reports: its layer's qualified module name, or for a block its
            modules' common prefix with the first and last of them.
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"depthwise1d"``, ``"depthwise2d"``,
            ``"embedding"`` (a layer that the closed form fits; a depthwise one channel by channel, an
            embedding of the input's token ids exactly by its aligned average), ``"per_channel"`` (a
            module with per-channel parameters its output is affine in: a LayerNorm, GroupNorm or
            InstanceNorm, a PReLU; `fedfuse.fusion.per_channel`) or ``"block"`` (fitted by the gradient
            variant only).
        width: its neurons: output features or channels.
        space: the name of the space its neurons live in (the level's own name, or the stream's).
        layer, norm: the Linear/Conv module and the BatchNorm folded into it (layers only).
        parameters: qualified names of every parameter the level fits.
        input, output: where its input and its neurons are read (places: graph nodes when traced,
            ``"<module>:input"`` / ``"<module>:output"`` when declared).
        axis: the axis of the output that holds the neurons.
        residual: places whose fused values are subtracted from the level's targets: the other terms of
            the residual sum it completes.
        target: where the parents' values that make its targets are read: its output, or the sum it
            completes.
        source: the space of the channels its input carries (None: the model's input, or channels that
            keep their index; ``"?"``: unknown), and positions: entries per channel along the input's
            channel axis (a Linear after a flatten of ``[C, H, W]`` sees ``H·W`` per channel).
        concatenated: when its input concatenates several spaces along the channels, each space (None:
            channels that keep their index) and its channels per parent, in order; ``source`` is then
            ``"?"``, as no one space feeds it.
        reason: why only the gradient variant can fit it (blocks).
    """

    name: str
    kind: str
    width: int
    space: str
    layer: str | None
    norm: str | None
    parameters: tuple[str, ...]
    input: str
    output: str
    axis: int
    residual: tuple[str, ...] = ()
    target: str = ""
    source: str | None = None
    positions: int = 1
    concatenated: tuple[tuple[str | None, int], ...] = ()
    reason: str | None = None

    @property
    def closed_form(self) -> bool:
        """Whether the linear variant can fit it (a Linear or convolution, BatchNorm folded in; an
        embedding; a module with per-channel parameters)."""
        return self.kind in LAYER_KINDS

    @property
    def channelwise(self) -> bool:
        """Whether each neuron reads its own input channel alone (a depthwise convolution)."""
        return self.kind in CHANNELWISE_KINDS

    @property
    def modules(self) -> tuple[str, ...]:
        """The qualified names of the modules that hold its parameters."""
        return tuple(dict.fromkeys(name.rpartition(".")[0] for name in self.parameters))


@dataclass(frozen=True)
class Point:
    """Where a space's neurons are measured for grouping: a place and the axis of its neurons."""

    place: str
    axis: int


@dataclass(frozen=True)
class Space:
    """A set of neurons that fusion groups once: one level's outputs, or a residual stream's channels.

    Attributes:
        name: the name of its first level.
        width: its neurons (per parent).
        fixed: its neurons keep their index in every parent (grouped by index, not by k-means).
        classes: it is the model's output: neuron c is class c, weighted per class.
        levels: the levels whose outputs are in it, in fit order.
        points: where its neurons are read for grouping: each level's output and each residual sum.
        why_fixed: for a fixed space that is not the classes, the rule that fixed it (an operation on its
            neurons that fusion has no rule for, say), shown by `describe_levels`.
    """

    name: str
    width: int
    fixed: bool
    classes: bool
    levels: tuple[str, ...]
    points: tuple[Point, ...]
    why_fixed: str | None = None


@dataclass(frozen=True)
class LevelPlan:
    """A model's levels in the order they are fitted, the spaces they live in, and how to read them.

    Attributes:
        model: the model's class name.
        levels: in fit order (a level comes after every level its input or residual depends on).
        spaces: by name.
        graph: the traced graph, or None when declared levels are read with hooks.
        unused: parameters the forward never uses (they cannot change the function).
    """

    model: str
    levels: tuple[Level, ...]
    spaces: Mapping[str, Space]
    graph: fx.Graph | None = None
    unused: tuple[str, ...] = field(default=())

    @property
    def traced(self) -> bool:
        return self.graph is not None

    @property
    def output_width(self) -> int:
        """The model's classes (1 for a model returning one value per sample): its output space's width."""
        return self.classes.width

    @property
    def classes(self) -> Space:
        """The space of the model's output, its classes.

        Raises:
            ValueError: no layer's neurons reach the output as they are (the forward sums them, or
                flattens them across the batch): fusion cannot tell which neuron is which class.
        """
        for space in self.spaces.values():
            if space.classes:
                return space
        raise ValueError(
            f"{self.model}'s output is no layer's neurons as they are (an operation without a rule mixes "
            "them, e.g. a sum over them or a flatten across the batch), so fusion cannot tell its classes "
            "apart; return the output layer's values, [N, classes], or [N] for one output"
        )

    def variants(self, level: Level) -> tuple[str, ...]:
        return ("linear", "gradient") if level.closed_form else ("gradient",)

    @property
    def resizable(self) -> bool:
        """Whether a fused model of another width can be made (`FusionConfig.width_multiplier`): traced,
        and every level a layer with all its inputs in every neuron, so that each space's writers and
        readers are known."""
        return self.traced and all(
            level.closed_form
            and not level.channelwise
            and not level.concatenated
            and level.layer is not None
            and level.kind != "embedding"
            for level in self.levels
        )

    def check(self, variant: str, width_multiplier: float = 1.0) -> None:
        """Raise when ``variant`` cannot fit every level, or the width cannot change.

        Raises:
            ValueError: naming the levels that only the gradient variant fits, and why; or why the
                width cannot change.
        """
        _ = self.classes  # an output whose classes cannot be told is refused whatever the variant
        if width_multiplier != 1 and not self.resizable:
            raise ValueError(
                "width_multiplier resizes traced models whose levels are all dense layers; "
                + (
                    "declared levels keep their width"
                    if not self.traced
                    else f"{self.model} has blocks, embeddings, depthwise convolutions, norms or PReLUs "
                    "with per-channel parameters, or concatenated channels"
                )
            )
        if variant != "linear":
            return
        blocks = [level for level in self.levels if not level.closed_form]
        if blocks:
            reasons = "; ".join(f"'{level.name}': {level.reason}" for level in blocks[:3])
            more = f" (and {len(blocks) - 3} more)" if len(blocks) > 3 else ""
            raise ValueError(
                f"the linear variant fits Linear/Conv levels in closed form, but {self.model} has "
                f"{len(blocks)} level(s) only the gradient variant fits{more}: {reasons}. Use "
                "FusionConfig(variant='auto') (the closed form for the rest, gradient descent for these) "
                "or variant='gradient'"
            )

    def table(self) -> str:
        """One row per level: name, kind, width, space (stream), what feeds it, which variants fit it."""
        header = ("level", "kind", "width", "space", "input", "variants")
        rows = []
        for level in self.levels:
            space = self.spaces[level.space]
            label = "classes" if space.classes else "fixed" if space.fixed else space.name
            if len(space.levels) > 1 and not space.fixed:
                label = f"stream {space.name}"
            source = "input" if level.source is None else level.source
            if level.concatenated:
                source = "+".join(part or "input" for part, _ in level.concatenated)
            if level.positions > 1:
                source += f" x{level.positions}"
            if level.residual:
                source += f" (+{len(level.residual)} residual)"
            rows.append(
                (level.name, level.kind, str(level.width), label, source, ", ".join(self.variants(level)))
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = [
            f"{self.model}: {len(self.levels)} levels ({'traced' if self.traced else 'declared'})",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        blocks = [level for level in self.levels if not level.closed_form]
        lines += [f"  {level.name}: {level.reason}" for level in blocks]
        lines += [
            f"  {space.name}: matched by index, not grouped: {space.why_fixed}"
            for space in self.spaces.values()
            if space.why_fixed
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe_levels(
    model: nn.Module, example_input: Tensor, levels: Sequence[LevelSpec | str] | None = None
) -> LevelPlan:
    """The levels fusion would cut ``model`` into, without fusing anything: print the result for a table
    of each level's name, kind, width, space (stream), input, and the variants that can fit it.

    Args:
        model: the model (not modified: an eval-mode copy is traced).
        example_input: a batch the model accepts (a few calibration samples).
        levels: a declaration that overrides the model's own (`fedfuse.fusion.declared`).

    Raises:
        ValueError: tied parameters, a module with parameters used twice, or a block whose neurons
            cannot be told apart (see the message).
        UntraceableModelError: the model cannot be traced and declares no levels.
    """
    return plan_levels(without_parametrizations(copied(model)).eval(), example_input, levels)


def plan_levels(
    model: nn.Module, example: Tensor, levels: Sequence[LevelSpec | str] | None = None
) -> LevelPlan:
    """The `LevelPlan` of an eval-mode ``model`` (traced as it is), run on ``example`` to see shapes."""
    check_shared_parameters(model)
    declared = declared_levels(model, levels)
    if declared is not None:
        return _declared_plan(model, example, declared)
    graph_module = trace(model, example=example)
    input_node(graph_module.graph)
    output_node(graph_module.graph)
    return _TracedPlanner(model, graph_module, propagate(graph_module, example)).plan()


def check_shared_parameters(model: nn.Module) -> None:
    """Refuse parameters shared between modules (tied weights): fusion fits each level's parameters on
    their own, once.

    A module registered under two names is one module, not a tie: locuslab's TCN keeps each convolution
    as ``self.conv1`` and again inside ``self.net``, and calls it once. Its fitted parameters reach both
    names, which hold the same tensors. (A module *called* twice is refused when the model is traced.)

    Raises:
        ValueError: naming both places of a shared parameter.
    """
    seen: dict[int, tuple[str, nn.Module]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        if id(parameter) in seen and seen[id(parameter)][1] is not owner:
            raise ValueError(
                f"parameter '{name}' is the same tensor as '{seen[id(parameter)][0]}' (tied weights); fusion "
                "fits every level on its own and cannot keep them tied. Give each module its own parameters"
            )
        seen.setdefault(id(parameter), (name, owner))


# --- traced models ------------------------------------------------------------------------------------------
class _TracedPlanner:
    def __init__(self, model: nn.Module, graph_module: fx.GraphModule, channels: ChannelMap) -> None:
        self.model, self.graph_module, self.map = model, graph_module, channels
        self.nodes = [node for node in graph_module.graph.nodes]
        self.position = {node.name: index for index, node in enumerate(self.nodes)}
        self.by_name = {node.name: node for node in self.nodes}
        self.opaque = dict(channels.opaque)
        # Concatenations of spaces that only a block made (their layers absorbed in it, or a recurrent
        # state's `h[-2]` and `h[-1]`): the block's output, one space of its own (`_block_output`).
        self.block_outputs: dict[tuple[tuple[int, int], ...], int] = {}

    def plan(self) -> LevelPlan:
        self._check_module_reuse()
        owned = self._mark_parameter_uses()
        blocks = self._blocks() if self.opaque else []
        absorbed = {name for block in blocks for name in block[2]}
        atomic = [call for call in self.map.layers.values() if call.node not in absorbed]
        # Blocks first: a region with nothing to train fixes the space it reads, which layers must see.
        block_levels = [level for level in (self._block_level(*block) for block in blocks) if level]
        levels = [self._layer_level(call) for call in atomic] + block_levels
        levels = self._complete_residuals(levels)
        levels = self._order(levels)
        spaces, levels = self._spaces(levels)
        used = owned | {p for level in levels for p in level.parameters}
        unused = tuple(name for name, _ in self.model.named_parameters() if name not in used)
        return LevelPlan(type(self.model).__name__, tuple(levels), spaces, self.graph_module.graph, unused)

    # -- checks ----------------------------------------------------------------------------------------------
    def _check_module_reuse(self) -> None:
        calls: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for name, count in calls.items():
            module = self.graph_module.get_submodule(name)
            if count > 1 and any(True for _ in module.parameters()):
                raise ValueError(
                    f"module '{name}' ({type(module).__name__}) holds parameters and is called {count} "
                    "times in the forward pass; fusion would need a different fit for each call. Give each "
                    "call its own module (a parameter-free module, like a pooling layer, may be reused)"
                )

    def _mark_parameter_uses(self) -> set[str]:
        """Parameters of layers and folded norms; a parameter read directly (get_attr) makes its users
        opaque, and refuses if it belongs to a layer (a functional use of a layer's weight ties them)."""
        owned = set()
        for call in self.map.layers.values():
            for module in filter(None, (call.module, call.norm)):
                owned |= {
                    f"{module}.{name}"
                    for name, _ in self.graph_module.get_submodule(module).named_parameters()
                }
        for node in self.nodes:
            if node.op != "get_attr":
                continue
            target = str(node.target)
            if not _is_parameter(self.graph_module, target):
                continue
            if target in owned:
                raise ValueError(
                    f"parameter '{target}' is used outside its module in the forward pass (tied to another "
                    "use); fusion fits each layer on its own and cannot keep the uses tied"
                )
            for user in node.users:
                self.opaque.setdefault(user.name, f"parameter '{target}' is used outside a Linear/Conv layer")
        return owned

    # -- blocks ----------------------------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[str, str, set[str]]]:
        """Regions between single-tensor cuts that hold an opaque node: (input, output, node names)."""
        folded = {call.node for call in self.map.layers.values() if call.norm_node}
        last_use: dict[str, int] = {}
        for node in self.nodes:
            for user in node.users:
                last_use[node.name] = max(last_use.get(node.name, -1), self.position[user.name])
        batch = self.map.shapes[input_node(self.graph_module.graph)][:1]
        cuts: list[tuple[int, str]] = []
        live: set[str] = set()
        for index, node in enumerate(self.nodes):
            if node.op == "output":
                break
            if node.op != "get_attr" and node.name in last_use:
                live.add(node.name)
            live = {name for name in live if last_use[name] > index}
            if len(live) == 1:
                (alive,) = live
                # A cut holds one tensor of samples along its first axis: not a tuple (a recurrent
                # layer's (outputs, state)), nor a state [layers, N, H], whose samples are on axis 1.
                if (
                    alive not in folded
                    and self.by_name[alive].op != "get_attr"
                    and self.map.shapes.get(alive, ())[:1] == batch
                ):
                    cuts.append((index, alive))
        cuts.append((len(self.nodes) - 1, output_node(self.graph_module.graph)))
        regions = []
        for (start, entry), (stop, exit_) in zip(cuts, cuts[1:]):
            names = {node.name for node in self.nodes[start + 1 : stop + 1] if node.op not in ("output",)}
            if any(name in self.opaque for name in names):
                regions.append((entry, exit_, names))
        return regions

    def _block_level(self, entry: str, exit_: str, names: set[str]) -> Level | None:
        """The region as a level, or None when it holds no parameter: then it only reads its input, whose
        channels must keep their index (nothing trained can absorb how an operation without a rule, a
        slice say, treats them), so their space is fixed."""
        modules = [
            str(node.target)
            for node in self.nodes
            if node.name in names
            and node.op == "call_module"
            and any(True for _ in self.graph_module.get_submodule(str(node.target)).parameters())
        ]
        parameters = [
            f"{module}.{name}"
            for module in dict.fromkeys(modules)
            for name, _ in self.graph_module.get_submodule(module).named_parameters()
        ]
        read = [  # parameters read directly (get_attr), wherever fx placed the read
            str(node.target)
            for node in self.nodes
            if node.op == "get_attr"
            and _is_parameter(self.graph_module, str(node.target))
            and any(user.name in names for user in node.users)
        ]
        modules += read
        parameters += read
        reasons = [
            self.opaque[node.name] for node in self.nodes if node.name in self.opaque and node.name in names
        ]
        if not parameters:
            source = self.map.annotations.get(entry)
            if isinstance(source, Channels):
                self.map.fix(source.space, reasons[0])
            return None
        annotation = self._block_output(exit_, names)
        shape = self.map.shapes.get(exit_, ())
        output = output_node(self.graph_module.graph)
        if isinstance(annotation, Channels):
            axis, width = annotation.axis, shape[annotation.axis]
        elif annotation is UNKNOWN and exit_ != output:
            raise ValueError(
                f"fusion cannot tell which neurons the block ending at '{exit_}' outputs ({reasons[0]}), "
                "so it cannot match them across the parents; declare the model's levels (fusion_levels() "
                "or fuse(levels=[...])), each ending where its output holds one neuron per channel on one "
                "axis, and fuse them with variant='gradient'"
            )
        else:
            axis = len(shape) - 1
            width = shape[axis] if shape else 1
        name = _block_name(modules) if modules else exit_
        return Level(
            name=name,
            kind="block",
            width=width,
            space="",
            layer=None,
            norm=None,
            parameters=tuple(dict.fromkeys(parameters)),
            input=entry,
            output=exit_,
            axis=axis,
            target=exit_,
            source=self._source_name(self.map.annotations.get(entry)),
            reason=reasons[0],
        )

    def _block_output(self, exit_: str, names: set[str]) -> Annotation:
        """What a block outputs: its exit's annotation, or, for channels concatenated from spaces of which
        some only the block makes (no level outside it), a new space of them all, which every layer
        reading that concatenation reads instead (`block_outputs`). Where the block's own channels sit
        beside channels that keep their index or that it passes through from before (DenseNet's running
        concatenation, a BatchNorm of the input), no grouping of the block can move those, so the new
        space keeps its index too."""
        annotation = self.map.annotations.get(exit_)
        if not isinstance(annotation, Concatenated):
            return annotation
        made_outside = {call.space for call in self.map.layers.values() if call.node not in names}
        streams_outside = {self.map.find(space) for space in made_outside} - {FIXED}
        passed = [
            space == FIXED or space in made_outside or self.map.find(space) in streams_outside
            for space, _ in annotation.parts
        ]
        if all(passed):
            return annotation
        space = self.block_outputs[annotation.parts] = self.map.new_space(annotation.width)
        if any(passed):
            self.map.fix(
                space, "a block's output concatenates its own channels with channels it passes through"
            )
        self.map.annotations[exit_] = Channels(space, annotation.axis, annotation.positions)
        return self.map.annotations[exit_]

    # -- layers ----------------------------------------------------------------------------------------------
    def _layer_level(self, call: LayerCall) -> Level:
        node = self.by_name[call.node]
        parameters = [
            f"{module}.{name}"
            for module in filter(None, (call.module, call.norm))
            for name, _ in self.graph_module.get_submodule(module).named_parameters()
        ]
        annotation = self.map.annotations[call.output_node]
        assert isinstance(annotation, Channels)
        source = call.input
        if isinstance(source, Concatenated) and source.parts in self.block_outputs:
            source = Channels(self.block_outputs[source.parts], source.axis, source.positions)
        concatenated = (
            tuple((self._source_name(Channels(space, 1)), width) for space, width in source.parts)
            if isinstance(source, Concatenated)
            else ()
        )
        return Level(
            name=call.module,
            kind=call.kind,
            width=call.width,
            space="",
            layer=None if call.kind == "per_channel" else call.module,
            norm=call.norm,
            parameters=tuple(parameters),
            input=node.all_input_nodes[0].name,
            output=call.output_node,
            axis=annotation.axis,
            target=call.output_node,
            source=self._source_name(source),
            positions=source.positions if isinstance(source, (Channels, Concatenated)) else 1,
            concatenated=concatenated,
        )

    def _source_name(self, annotation: Annotation) -> str | None:
        if annotation is None or annotation is TIED:
            return None
        if annotation is UNKNOWN or not isinstance(annotation, Channels):
            return "?"
        if self.map.fixed(annotation.space):
            return None
        return f"#{self.map.find(annotation.space)}"  # renamed to the space's name in _spaces

    # -- residual sums ---------------------------------------------------------------------------------------
    def _complete_residuals(self, levels: list[Level]) -> list[Level]:
        """Let the last level feeding a residual sum directly fit the sum's target minus its other terms."""
        chains: dict[str, list[tuple[Level, list[str]]]] = {}
        for level in levels:
            if level.kind == "block":
                continue
            root, others = self._sum_chain(self.by_name[level.output])
            if root is not None:
                chains.setdefault(root, []).append((level, others))
        completed = {}
        for root, members in chains.items():
            level, others = max(members, key=lambda member: self.position[member[0].output])
            completed[level.name] = (root, tuple(others))
        return [
            replace(level, target=completed[level.name][0], residual=completed[level.name][1])
            if level.name in completed
            else level
            for level in levels
        ]

    def _sum_chain(self, node: fx.Node) -> tuple[str | None, list[str]]:
        """The root of the chain of sums ``node`` feeds directly (each step its only use), and the other
        terms along the way; (None, []) when ``node`` feeds no sum or a term is not a tensor."""
        others: list[str] = []
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if (
                user.op not in ("call_function", "call_method")
                or user.target not in SUMS
                or user.kwargs
                or not isinstance(self.map.annotations.get(user.name), Channels)
            ):
                break
            terms = [arg for arg in user.args if arg is not current]
            if len(terms) != 1 or not isinstance(terms[0], fx.Node) or terms[0].name not in self.map.shapes:
                return None, []
            if self.map.shapes[terms[0].name] != self.map.shapes[user.name]:
                return None, []  # a broadcast term: not a residual connection
            others.append(terms[0].name)
            current = user
        return (current.name, others) if others else (None, [])

    # -- order -----------------------------------------------------------------------------------------------
    def _order(self, levels: list[Level]) -> list[Level]:
        """Fit order: graph order, except that a level waits for every level its input or residual terms
        depend on."""
        dependencies: dict[str, set[str]] = {}
        outputs = {level.output: level.name for level in levels}
        ancestors: dict[str, set[str]] = {}
        for node in self.nodes:
            found = (
                set().union(*(ancestors[arg.name] for arg in node.all_input_nodes))
                if node.all_input_nodes
                else set()
            )
            if node.name in outputs:
                found = found | {outputs[node.name]}
            ancestors[node.name] = found
        for level in levels:
            needs = set(ancestors[level.input])
            for place in level.residual:
                needs |= ancestors[place]
            needs.discard(level.name)
            dependencies[level.name] = needs
        position = {level.name: self.position[level.input] for level in levels}
        by_name = {level.name: level for level in levels}
        waiting = {name: set(needs) for name, needs in dependencies.items()}
        ready = [(position[name], name) for name, needs in waiting.items() if not needs]
        heapq.heapify(ready)
        ordered: list[Level] = []
        while ready:
            _, name = heapq.heappop(ready)
            ordered.append(by_name[name])
            for other, needs in waiting.items():
                if name in needs:
                    needs.discard(name)
                    if not needs:
                        heapq.heappush(ready, (position[other], other))
        if len(ordered) != len(levels):  # pragma: no cover - a graph has no cycles
            raise RuntimeError("the levels' dependencies form a cycle")
        return ordered

    # -- spaces ----------------------------------------------------------------------------------------------
    def _spaces(self, levels: list[Level]) -> tuple[dict[str, Space], list[Level]]:
        def root(level: Level) -> int | None:
            annotation = self.map.annotations.get(level.output)
            return self.map.find(annotation.space) if isinstance(annotation, Channels) else None

        names: dict[int, str] = {}
        members: dict[str, list[Level]] = {}
        for level in levels:
            key = root(level)
            if key is None or key == FIXED:
                members[level.name] = [level]
                continue
            names.setdefault(key, level.name)
            members.setdefault(names[key], []).append(level)
        spaces: dict[str, Space] = {}
        renamed: dict[str, str] = {f"#{key}": name for key, name in names.items()}
        output = output_node(self.graph_module.graph)
        for name, group in members.items():
            key = root(group[0])
            fixed = key is None or key == FIXED
            annotation = self.map.annotations.get(group[0].output)
            classes = fixed and (
                (isinstance(annotation, Channels) and annotation.space in self.map.outputs)
                or group[0].output == output
            )
            points = tuple(dict.fromkeys(Point(level.output, level.axis) for level in group))
            points += tuple(
                Point(level.target, level.axis) for level in group if level.target != level.output
            )
            why = None
            if fixed and not classes and isinstance(annotation, Channels):
                why = self.map.fixed_because.get(
                    annotation.space, "its stream was joined with one whose neurons keep their index"
                )
            spaces[name] = Space(
                name, group[0].width, fixed, classes, tuple(level.name for level in group), points, why
            )
        space_of = {level.name: name for name, group in members.items() for level in group}
        levels = [
            replace(
                level,
                space=space_of[level.name],
                source=renamed.get(level.source, level.source) if level.source else None,
                concatenated=tuple(
                    (renamed.get(part, part) if part else None, width) for part, width in level.concatenated
                ),
            )
            for level in levels
        ]
        return spaces, levels


def _is_parameter(module: nn.Module, target: str) -> bool:
    prefix, _, name = target.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return name in owner._parameters


def _block_name(modules: list[str]) -> str:
    modules = list(dict.fromkeys(modules))
    if len(modules) == 1:
        return modules[0]
    parts = [name.split(".") for name in modules]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    strip = len(prefix) + 1 if prefix else 0
    first, last = modules[0][strip:], modules[-1][strip:]
    return f"{prefix}[{first}..{last}]" if prefix else f"[{first}..{last}]"


# --- declared levels ----------------------------------------------------------------------------------
def _declared_plan(model: nn.Module, example: Tensor, declared: list[LevelSpec]) -> LevelPlan:
    """Levels the model declares, read with hooks on the declared modules (no tracing needed)."""
    modules = dict(model.named_modules())
    shapes = _declared_output_shapes(model, example, [spec.module for spec in declared])
    levels: list[Level] = []
    space_of: dict[str, str] = {}
    for index, spec in enumerate(declared):
        module = modules[spec.module]
        layer, norm = _declared_layer(spec.module, module)
        shape = shapes[spec.module]
        kind = _layer_kind(modules[layer], len(shape)) if layer else "block"
        axis = 1 if kind.startswith("conv") or (kind == "block" and len(shape) == 4) else len(shape) - 1
        space = space_of[spec.stream] if spec.stream else spec.module
        space_of[spec.module] = space
        levels.append(
            Level(
                name=spec.module,
                kind=kind,
                width=shape[axis],
                space=space,
                layer=layer,
                norm=norm,
                parameters=tuple(f"{spec.module}.{name}" for name, _ in module.named_parameters()),
                input=f"{spec.module}:input",
                output=f"{spec.module}:output",
                axis=axis,
                target=f"{spec.module}:output",
                source=None if index == 0 else "?",
                reason=None
                if layer
                else f"a declared {type(module).__name__}, not a dense Linear/Conv layer",
            )
        )
    spaces: dict[str, Space] = {}
    last = levels[-1].name
    for level in levels:
        grouped = [other for other in levels if other.space == level.space]
        if level.space not in spaces:
            fixed = level.name == last
            spaces[level.space] = Space(
                level.space,
                level.width,
                fixed,
                fixed,
                tuple(other.name for other in grouped),
                tuple(Point(other.output, other.axis) for other in grouped),
            )
    return LevelPlan(type(model).__name__, tuple(levels), spaces, None)


def _declared_layer(name: str, module: nn.Module) -> tuple[str | None, str | None]:
    """The layer (and BatchNorm) a declared module is, when the closed form can fit it: a dense one (a
    declared grouped or depthwise convolution is a block: its channels' grouping is its input's, which
    declared levels do not trace)."""
    if isinstance(module, LAYERS) and plain_forward(module) and getattr(module, "groups", 1) == 1:
        return name, None
    if (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and len(module) == 2
    ):
        first, second = module[0], module[1]
        if (
            isinstance(first, LAYERS)
            and plain_forward(first)
            and getattr(first, "groups", 1) == 1
            and isinstance(second, (nn.BatchNorm1d, nn.BatchNorm2d))
            and plain_forward(second)
            and second.track_running_stats
        ):
            return f"{name}.0", f"{name}.1"
    return None, None


def _layer_kind(module: nn.Module, dims: int) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return f"conv{dims - 2}d"


def _declared_output_shapes(
    model: nn.Module, example: Tensor, names: list[str]
) -> dict[str, tuple[int, ...]]:
    """Each declared module's output shape on ``example``; checks each runs once, in the declared order."""
    modules = dict(model.named_modules())
    calls: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(_: nn.Module, __: tuple, output: Tensor) -> None:
            calls.append(name)
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"declared level '{name}' returns {type(output).__name__}, not one tensor; a level's "
                    "output is where the next one reads its neurons, so wrap the module in one that "
                    "returns that tensor (for a recurrent layer, the outputs of `out, state = rnn(x)`) "
                    "and declare the wrapper"
                )
            shapes[name] = tuple(output.shape)

        return hook

    handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if calls != names:
        raise ValueError(
            f"the declared levels must each run once, in the declared order; the forward pass ran {calls}"
        )
    return shapes
