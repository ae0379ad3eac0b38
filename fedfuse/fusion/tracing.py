"""Tracing a model into a `torch.fx` graph, and cutting sub-graphs out of it.

Fusion reads values inside a model (a layer's input, a BatchNorm's output, the sum at a residual
connection) and runs pieces of it (one level, from its input to its output). Symbolic tracing records
what ``forward`` actually runs, whatever the model's class: a custom ``nn.Module`` with functional
activations, an ``nn.Sequential`` subclass with its own ``forward``, a module called twice, and (traced
with the shapes of an example input) Python loops and branches on the input's shape. Linear,
convolution and BatchNorm modules stay whole (leaves), as do the modules a caller names.

A sub-graph (`subgraph`) shares its modules and parameters with the model it was cut from: running it
on a fused model computes with the fused model's current weights, and training it trains them.
"""

from __future__ import annotations

import copy
import inspect
import operator
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from fedfuse.fusion.channels import METADATA, SHAPE_METHODS

#: Modules kept whole when tracing: fusion fits them, or reads what they compute.
LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


class UntraceableModelError(TypeError):
    """The model's forward could not be traced (e.g. Python control flow that depends on the data)."""


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.named_leaves = frozenset(leaves)
        # A buffer read in the forward (an input's mean and std, ``(x - self.mean.view(1, -1, 1, 1))``) is
        # a graph node, read from whichever model the graph runs with; not a constant computed from the
        # traced model's buffer, which no other model would hold.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            isinstance(module, LEAVES)
            or qualified_name in self.named_leaves
            or super().is_leaf_module(module, qualified_name)
        )


class _ShapeTracer(_Tracer):
    """A tracer that also computes every value on an example input, so that Python control flow on the
    tensors' *shapes* can be followed: ``for s in x.size()[1:]`` (PyTorch's tutorial ``num_flat_features``)
    iterates over one proxy per axis, and ``if x.dim() == 3`` or ``if len(x.shape) == 3`` takes the
    branch the example takes. Only values computed from shapes and other metadata (``size``, ``dim``,
    ``numel``, ``shape``, ``ndim``, ``dtype``, ``device``) and constants are used so; control flow on
    tensor values (``if x.sum() > 0``, ``.item()``) is refused as by plain tracing. A branch on the
    batch size would be taken for the example's; `trace` checks the graph against the model on two
    batch sizes.

    Like ``torch.fx.experimental.meta_tracer.MetaTracer`` (which attaches meta tensors to proxies and makes
    ``size()`` a constant), but with real values and shape queries kept in the graph: a constant batch
    size would break every later run on other batches."""

    def __init__(self, leaves: Iterable[str], example: Any) -> None:
        super().__init__(leaves)
        self.example = example
        self.values: dict[fx.Node, tuple[Any, bool]] = {}  # node -> (value, computed from shapes only)
        self._computing = False  # while a value is computed, modules and attributes are not recorded

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        nodes: list[fx.Node] = []
        fx.node.map_aggregate((args, kwargs), lambda arg: _collect(arg, nodes))
        known = all(node in self.values for node in nodes)
        value = self._value(kind, target, args, kwargs) if known else _UNKNOWN
        from_shapes = (
            (kind == "call_method" and target in SHAPE_METHODS)
            or (kind == "call_function" and target is getattr and args[1] in METADATA)
            or (
                kind == "call_function"
                and bool(nodes)
                and all(self.values[node][1] for node in nodes)
                and not isinstance(value, Tensor)
            )
        )
        self.values[proxy.node] = (value, from_shapes and value is not _UNKNOWN)
        return proxy

    def _value(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        def real(value: Any) -> Any:
            return self.values[value.node][0] if isinstance(value, fx.Proxy) else value

        args, kwargs = fx.node.map_aggregate((args, kwargs), real)
        self._computing = True
        try:
            with torch.no_grad():
                if kind == "placeholder":  # the input; the arguments traced with their defaults are not
                    return self.example if not self.values else _UNKNOWN
                if kind == "get_attr":
                    return _attribute(self.root, str(target)).detach().clone()
                if kind == "call_module":
                    return self.root.get_submodule(str(target))(*args, **kwargs)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
        except Exception:  # a value that cannot be computed here only leaves its shape unknown
            return _UNKNOWN
        finally:
            self._computing = False
        return _UNKNOWN

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def _shape_value(self, obj: fx.Proxy) -> Any:
        value, from_shapes = self.values.get(obj.node, (_UNKNOWN, False))
        return value if from_shapes else _UNKNOWN

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._shape_value(obj)
        return value if isinstance(value, bool) else super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self._shape_value(obj)
        if isinstance(value, tuple):
            return iter([obj[index] for index in range(len(value))])
        return super().iter(obj)


class _Sized:
    """``len()`` of a proxy whose value is a shape (``len(x.shape)``); plain tracing refuses every len."""

    tracer: _ShapeTracer

    def __len__(self) -> int:
        value = self.tracer._shape_value(self)  # type: ignore[arg-type]
        if isinstance(value, tuple):
            return len(value)
        return fx.Proxy.__len__(self)  # type: ignore[arg-type]


class _ShapeProxy(_Sized, fx.Proxy):
    def __getattr__(self, attribute: str) -> fx.proxy.Attribute:
        return _ShapeAttribute(self, attribute)


class _ShapeAttribute(_Sized, fx.proxy.Attribute):
    pass


class _Unknown:
    def __repr__(self) -> str:
        return "unknown"


_UNKNOWN = _Unknown()


def _collect(value: Any, nodes: list[fx.Node]) -> None:
    if isinstance(value, fx.Proxy):
        nodes.append(value.node)


def _attribute(root: nn.Module, target: str) -> Any:
    for atom in target.split("."):
        root = getattr(root, atom)
    return root


def trace(model: nn.Module, leaves: Iterable[str] = (), example: Tensor | None = None) -> fx.GraphModule:
    """``model``'s forward as a graph, with Linear/Conv/BatchNorm and the modules named in ``leaves`` as
    single calls. The model is traced as it is (trace eval-mode copies: ``self.training`` is read as a
    constant).

    A forward with Python control flow on the input's shape (a loop over ``x.size()``, ``if x.dim() ==
    3``) is traced again with the values computed on ``example`` (`_ShapeTracer`), and the graph is kept
    only if it computes what the model computes on the example and on a batch of another size. Arguments
    after the input that have defaults (``return_features=False``, ``mask=None``) are traced with their
    defaults, as fusion calls the model (`_with_defaults`).

    Raises:
        UntraceableModelError: the forward cannot be traced; the message says why and how to declare
            the model's levels instead.
    """
    defaults = _with_defaults(model)
    try:
        graph = _Tracer(leaves).trace(model, concrete_args=defaults)
    except Exception as error:  # fx raises TraceError, RuntimeError, TypeError... on what it cannot record
        graph = _trace_with_shapes(model, leaves, example, defaults, error)
    _drop_specialised_inputs(graph)
    _drop_unused_parts(graph)
    _make_constants_in_the_graph(graph, model)
    copy_before_in_place(graph, model)
    try:
        return fx.GraphModule(model, graph)
    except SyntaxError as error:  # fx writes the graph as Python, submodule names as attributes
        raise UntraceableModelError(
            f"{type(model).__name__}'s traced forward cannot be written as Python: "
            f"`{(error.text or '').strip()}` ({error.msg}); a submodule whose name is a Python keyword "
            "(an nn.ModuleDict key such as 'global') does this. Rename it, or declare the model's levels"
        ) from error


def _drop_unused_parts(graph: fx.Graph) -> None:
    """Remove the parts of a tuple that nothing reads: ``x, _ = torch.max(x, dim=2)`` records the indices
    too, and a rule for them (positions, no neurons) would fix the channels before, though nothing uses
    them. Taking a part computes nothing, so removing it changes no value."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)


#: The most values a tensor the forward makes from literals may hold to be written into the graph's code.
LITERAL_VALUES = 4096


def _make_constants_in_the_graph(graph: fx.Graph, model: nn.Module) -> None:
    """A tensor the forward makes from literals (``x - torch.tensor([0.5])``) is kept by fx as an attribute
    of the traced model (``_tensor_constant0``), which no other model of the architecture has: each is made
    again by the graph instead, on its input's device, so the graph runs with any parent.

    Raises:
        UntraceableModelError: such a tensor is too large to write into code (`LITERAL_VALUES`).
    """
    (source, *_) = [node for node in graph.nodes if node.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op != "get_attr" or not str(node.target).startswith("_tensor_constant"):
            continue
        value = _attribute(model, str(node.target))
        if value.numel() > LITERAL_VALUES:
            raise UntraceableModelError(
                f"the forward makes a constant tensor of {value.numel()} values from literals; register it "
                "as a buffer (self.register_buffer) so that fusion reads it from each model"
            )
        with graph.inserting_before(node):
            device = graph.call_function(getattr, (source, "device"))
            made = graph.call_function(
                torch.tensor, (value.tolist(),), {"dtype": value.dtype, "device": device}
            )
        node.replace_all_uses_with(made)
        graph.erase_node(node)


def _with_defaults(model: nn.Module) -> dict[str, Any] | None:
    """The default of each of ``forward``'s arguments after the first that has one: fusion calls the model
    with its input alone, so the trace may take them as constants (``torch.fx``'s ``concrete_args``)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {
        parameter.name: parameter.default
        for parameter in parameters[1:]
        if parameter.kind in kinds and parameter.default is not inspect.Parameter.empty
    }
    return defaults or None


#: The checks ``torch.fx`` inserts for an argument traced as a constant (`_with_defaults`), by name.
SPECIALISATION_CHECKS = frozenset({"_assert", "_assert_is_none", "eq"})


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove the inputs traced as constants, and fx's checks of their values: what is left takes the
    model's input alone. An input something else still reads stays (and is refused as a second input)."""
    for placeholder in [node for node in graph.nodes if node.op == "placeholder"][1:]:
        checks: list[fx.Node] = []
        stack = list(placeholder.users)
        while stack:
            node = stack.pop()
            if node not in checks:
                checks.append(node)
                stack.extend(node.users)
        if all(
            node.op == "call_function" and getattr(node.target, "__name__", "") in SPECIALISATION_CHECKS
            for node in checks
        ):
            for node in sorted(checks, key=list(graph.nodes).index, reverse=True):
                graph.erase_node(node)
            graph.erase_node(placeholder)


def _trace_with_shapes(
    model: nn.Module,
    leaves: Iterable[str],
    example: Tensor | None,
    defaults: dict[str, Any] | None,
    error: Exception,
) -> fx.Graph:
    reason = f"{type(error).__name__}: {error}{_where(error, model)}"
    if example is not None:
        try:
            graph = _ShapeTracer(leaves, example).trace(model, concrete_args=defaults)
        except Exception as again:
            reason = f"{type(again).__name__}: {again}{_where(again, model)}"
        else:
            mismatch = _differs_from_model(model, graph, example)
            if mismatch is None:
                return graph
            reason = mismatch
    raise UntraceableModelError(
        f"{type(model).__name__} cannot be traced by torch.fx ({reason}). "
        "Tracing fails on Python control flow that depends on the data (if/for over tensor values) "
        "and on len(tensor) (use tensor.shape[0]). Declare the model's levels instead: give it a "
        "method fusion_levels() returning, in forward order, the names of the modules whose outputs "
        "are level boundaries (LevelSpec(name, stream=...) for a block that adds into a residual "
        "stream), or pass fuse(..., levels=[...]); see fedfuse.fusion.declared"
    ) from error


def _where(error: Exception, model: nn.Module) -> str:
    """Where in the model's own code tracing failed (`` at file:line `code` ``), or nothing: the last frame
    of the error's traceback in a file that defines one of the model's modules."""
    files = set()
    for module in model.modules():
        try:
            files.add(inspect.getsourcefile(type(module)))
        except TypeError:  # a class without a source file
            continue
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename in files]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno} `{(frame.line or '').strip()}`"


def _differs_from_model(model: nn.Module, graph: fx.Graph, example: Tensor) -> str | None:
    """Why the graph traced with shapes does not compute the model's function, or None: compared on the
    example and on a batch of another size (a branch on the batch size would be taken for the
    example's)."""
    traced = fx.GraphModule(model, copy.deepcopy(graph))
    copy_before_in_place(traced.graph, model)
    traced.recompile()
    other = example[:1] if len(example) > 1 else torch.cat([example, example])
    for inputs in (example, other):
        with torch.no_grad():
            try:
                same = _same(traced(inputs), model(inputs))
            except Exception as error:
                return f"the graph traced with shapes fails on a batch of {len(inputs)}: {error}"
        if not same:
            return (
                f"the graph traced with shapes computes something else than the model on a batch of "
                f"{len(inputs)} (a branch on the batch size?)"
            )
    return None


def _same(first: Any, second: Any) -> bool:
    if isinstance(first, Tensor) and isinstance(second, Tensor):
        return first.shape == second.shape and torch.allclose(first, second, rtol=1e-4, atol=1e-5)
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))
    return type(first) is type(second)


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
