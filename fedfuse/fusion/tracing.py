"""Tracing a model into a `torch.fx` graph, and cutting sub-graphs out of it.

Fusion reads values inside a model (a layer's input, a BatchNorm's output, the sum at a residual
connection) and runs pieces of it (one level, from its input to its output). Symbolic tracing records
what ``forward`` actually runs, whatever the model's class: a custom ``nn.Module`` with functional
activations, an ``nn.Sequential`` subclass with its own ``forward``, a module called twice. Linear,
convolution and BatchNorm modules stay whole (leaves), as do the modules a caller names.

A sub-graph (`subgraph`) shares its modules and parameters with the model it was cut from: running it
on a fused model computes with the fused model's current weights, and training it trains them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import fx, nn

#: Modules kept whole when tracing: fusion fits them, or reads what they compute.
LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


class UntraceableModelError(TypeError):
    """The model's forward could not be traced (e.g. Python control flow that depends on the data)."""


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.named_leaves = frozenset(leaves)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            isinstance(module, LEAVES)
            or qualified_name in self.named_leaves
            or super().is_leaf_module(module, qualified_name)
        )


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """``model``'s forward as a graph, with Linear/Conv/BatchNorm and the modules named in ``leaves`` as
    single calls. The model is traced as it is (trace eval-mode copies: ``self.training`` is read as a
    constant).

    Raises:
        UntraceableModelError: the forward cannot be traced; the message says why and how to declare
            the model's levels instead.
    """
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception as error:  # fx raises TraceError, RuntimeError, TypeError... on what it cannot record
        raise UntraceableModelError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: {error}). "
            "Tracing fails on Python control flow that depends on the data (if/for over tensor values) "
            "and on len(tensor) (use tensor.shape[0]). Declare the model's levels instead: give it a "
            "method fusion_levels() returning, in forward order, the names of the modules whose outputs "
            "are level boundaries (LevelSpec(name, stream=...) for a block that adds into a residual "
            "stream), or pass fuse(..., levels=[...]); see fedfuse.fusion.declared"
        ) from error
    copy_before_in_place(graph, model)
    return fx.GraphModule(model, graph)


#: Functions that change their first argument: ``+=`` and its kin, item assignment.
IN_PLACE_FUNCTIONS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.setitem}
)


def changes_its_input(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes into the value of its first argument: an in-place function
    (`IN_PLACE_FUNCTIONS`, or one called with ``inplace=True``), a method named like ``relu_`` or ``add_``,
    or a module built with ``inplace=True`` (``nn.ReLU(inplace=True)``)."""
    if node.op == "call_function":
        return node.target in IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_module":
        return getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    return False


def copy_before_in_place(graph: fx.Graph, root: nn.Module) -> None:
    """Make each in-place operation of ``graph`` write into a copy of its input, not the input itself.

    Fusion keeps the values it reads (checkpoints, a stream's targets) and reads several places in one
    run; an in-place ``out += identity`` or ``ReLU(inplace=True)`` would otherwise overwrite a value
    already read (the block's sum, turned into its ReLU by the next block). One copy per in-place
    operation is the price, and every node's value is then what it computed.
    """
    for node in list(graph.nodes):
        if changes_its_input(node, root) and node.args and isinstance(node.args[0], fx.Node):
            with graph.inserting_before(node):
                copy = graph.call_method("clone", (node.args[0],))
            node.args = (copy, *node.args[1:])


def subgraph(graph: fx.Graph, inputs: Sequence[str], outputs: Sequence[str]) -> fx.Graph:
    """The part of ``graph`` that computes the nodes ``outputs`` from the nodes ``inputs``.

    The inputs become the sub-graph's placeholders (in that order); it returns the outputs' values (a
    tuple, in that order; the value itself for one output). Only what the outputs need is kept, so the
    computation past them is skipped.

    Raises:
        ValueError: an output needs a value that is none of ``inputs`` (the cut is not closed), or a
            name is not a node of the graph.
    """
    nodes = {node.name: node for node in graph.nodes}
    for name in (*inputs, *outputs):
        if name not in nodes:
            raise ValueError(f"'{name}' is not a node of the traced graph")
    needed: set[fx.Node] = set()
    stack = [nodes[name] for name in outputs]
    while stack:
        node = stack.pop()
        if node in needed or node.name in inputs:
            continue
        if node.op == "placeholder":
            raise ValueError(
                f"the values {list(outputs)} depend on the model input '{node.name}', "
                f"not only on {list(inputs)}"
            )
        needed.add(node)
        stack.extend(node.all_input_nodes)
    cut = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[name]: cut.placeholder(name) for name in inputs}
    for node in graph.nodes:
        if node in needed:
            env[node] = cut.node_copy(node, lambda arg: env[arg])
    values = [env[nodes[name]] for name in outputs]
    cut.output(values[0] if len(values) == 1 else tuple(values))
    return cut


def cut_at(graph: fx.Graph, place: str) -> tuple[str, ...]:
    """The nodes whose values, once ``place`` is computed, are all the rest of ``graph`` needs from the
    input: ``place`` and every earlier node computed from the input that a later node still uses (in graph
    order). In a chain that is ``place`` alone; inside a residual block it is the block's input too, which
    the shortcut still needs. Nodes that do not depend on the input (parameters, constants) are left out:
    a sub-graph recomputes them.

    Raises:
        ValueError: ``place`` is not a node of the graph.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}
    here = next((node for node in graph.nodes if node.name == place), None)
    if here is None:
        raise ValueError(f"'{place}' is not a node of the traced graph")
    from_input: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in from_input for arg in node.all_input_nodes):
            from_input.add(node)
    return tuple(
        node.name
        for node in graph.nodes
        if node is here
        or (
            node in from_input
            and order[node] < order[here]
            and any(order[user] > order[here] and user.op != "output" for user in node.users)
        )
    )


def runnable(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` (cut from a trace of a model of ``model``'s architecture) computing with ``model``'s own
    modules and parameters, shared, not copied."""
    return fx.GraphModule(model, graph)


#: `shared_code`'s result: called as ``code(model, *inputs)``.
SharedCode = Callable[..., Any]


def shared_code(model: nn.Module, graph: fx.Graph) -> SharedCode:
    """``graph``'s Python code, compiled once, to run with any model of ``model``'s architecture:
    ``code(other, *inputs)`` computes with ``other``'s modules and parameters.

    The code `torch.fx` generates reaches modules and parameters only through ``self``
    (``getattr(self.features, "0")(x)``), so one compilation serves every model of the architecture.
    Building a `torch.fx.GraphModule` per model instead generates and compiles the same code again for
    each: 60 ms of a 0.45 s fusion of eight MLPs."""
    return fx.GraphModule(model, graph).forward.__func__  # type: ignore[attr-defined]


def input_node(graph: fx.Graph) -> str:
    """The name of the traced model's (single) input.

    Raises:
        ValueError: the forward takes several inputs (fusion feeds it one calibration tensor).
    """
    placeholders = [node.name for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"the model's forward takes {len(placeholders)} inputs ({', '.join(placeholders)}); fusion feeds "
            "it one calibration tensor"
        )
    return placeholders[0]


def output_node(graph: fx.Graph) -> str:
    """The name of the node whose value the traced model returns.

    Raises:
        ValueError: the forward returns several values or something other than a computed tensor.
    """
    (output,) = [node for node in graph.nodes if node.op == "output"]
    value = output.args[0]
    if not isinstance(value, fx.Node):
        raise ValueError(
            f"the model's forward returns {type(value).__name__}; fusion needs a model that returns one "
            "tensor (its logits)"
        )
    return value.name


def tapped(
    model: nn.Module, graph: fx.Graph, places: Sequence[str]
) -> tuple[fx.GraphModule, list[nn.Module]]:
    """``model`` (as traced in ``graph``) with an ``nn.Identity`` after each node of ``places``, so that the
    values there are modules' outputs, which attribution methods (captum's layer methods) need."""
    taps = {place: nn.Identity() for place in places}
    copied = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = copied.node_copy(node, lambda arg: env[arg])
        if node.name in taps:
            env[node] = copied.call_module(f"fedfuse_tap_{list(taps).index(node.name)}", (env[node],))
    owner = fx.GraphModule(model, graph)
    for index, tap in enumerate(taps.values()):
        owner.add_module(f"fedfuse_tap_{index}", tap)
    return fx.GraphModule(owner, copied), [taps[place] for place in places]
