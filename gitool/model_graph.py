"""What a model computes, read from its ``forward`` with torch.fx, for the analytic methods.

The analytic reconstructions (``--method fc`` and ``conv``) invert a network layer by
layer from the classifier down to the input, so they need the model as a *chain*: the
input flows through Linear and Conv2d layers, each followed by at most one activation,
with reshapes (flatten, view, reshape) and eval-mode dropout in between, and the logits
come out of a last Linear without activation. Walking ``named_modules()`` cannot see that
chain: it drops a module used at two places and misses what ``forward`` does with
functions (``F.relu``, ``torch.flatten``, ``x.view``). torch.fx records the computation
itself: ``symbolic_trace`` turns ``forward`` into a graph of nodes (``call_module``,
``call_function``, ``call_method``), and running that graph on a probe batch gives every
node's value and so its shape.

:func:`read_chain` walks the graph back from the logits to the input and returns the
weight layers in order, each with its activation and its per-sample input and output
shapes; what the inversion cannot undo (a residual add, pooling, batch norm, attention,
a weight layer used twice, ...) is refused by naming the graph node and its operation.
:func:`classifier_name` finds the Linear whose output is the logits, without running
anything. No update, file or option is read here: the caller turns the chain into the
solvers' stages (gitool.reconstruct_analytic).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from gitool.errors import GitoolError

# Activations the analytic inversion knows (gitool.attacks.analytic_fc.ACTIVATIONS), in
# their module, function and method forms.
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leakyrelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
                        F.leaky_relu: "leakyrelu", F.leaky_relu_: "leakyrelu", torch.sigmoid: "sigmoid",
                        F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                      "tanh": "tanh", "tanh_": "tanh"}
LEAKY_DEFAULT_SLOPE = 0.01  # F.leaky_relu's and nn.LeakyReLU's default

# Steps that only relabel a sample's values (row-major order kept): the chain passes them.
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "view_as", "reshape_as"}

# Dropout: the identity in eval mode (or with p = 0); random masks nobody knows in train mode.
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}

# Why some common operations cannot be inverted, for the refusal line.
POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool2d)
POOLING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool2d,
                     F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

WHAT_WORKS = ("the analytic methods invert chains of Linear and Conv2d layers with relu, leaky relu, sigmoid or "
              "tanh activations, reshapes and eval-mode dropout")


class GraphRefusal(GitoolError):
    """The model's computation is not a chain the analytic methods can invert; the
    message names the graph node and its operation."""


@dataclass
class ChainLayer:
    """One Linear or Conv2d layer of the chain, as the model uses it."""

    name: str  # the module's qualified name: its parameters are NAME.weight and NAME.bias
    node: str  # the fx node that calls it
    module: nn.Module  # nn.Linear or nn.Conv2d
    input_shape: tuple[int, ...]  # per sample, as the layer receives it
    output_shape: tuple[int, ...]
    activation: str | None = None  # relu | leakyrelu | sigmoid | tanh after the layer
    leaky_slope: float = 0.2
    padding: tuple[int, int] = (0, 0)  # a conv's zero padding as numbers ('same' and 'valid' resolved)


@dataclass
class Dropout:
    """A dropout step of the chain: the identity unless it was active (``training``) with p > 0."""

    node: str
    operation: str
    p: float
    training: bool


@dataclass
class Chain:
    """The model as the analytic methods see it: weight layers from the input up (the last
    one is the classifier, whose output is the logits) and the dropout steps passed."""

    layers: list[ChainLayer]
    dropout: list[Dropout] = field(default_factory=list)

    @property
    def classifier(self) -> ChainLayer:
        return self.layers[-1]

    @property
    def hidden(self) -> list[ChainLayer]:
        return self.layers[:-1]


# ----------------------------------------------------------------------------- tracing


def trace(model: nn.Module) -> fx.GraphModule:
    """``forward`` as an fx graph. Arguments after the input that have defaults are fixed
    to them (``forward(x, return_features=False)``), so that branches on them resolve."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        parameters = []
    fixed = {p.name: p.default for p in parameters
             if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
    try:
        return fx.symbolic_trace(model, concrete_args=fixed or None)
    except Exception as exc:  # fx raises many types for forwards it cannot follow
        text = " ".join(str(exc).split())
        raise GraphRefusal(f"cannot read the forward of {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                           f"{text[:160]}); the analytic methods need a forward without data-dependent control "
                           "flow") from None


def _output_node(graph: fx.Graph, selector: int | str | None, name: str) -> fx.Node:
    """The graph node whose value forward returns as the logits."""
    from gitool.models import select_output

    output = next(node for node in graph.nodes if node.op == "output")
    return select_output(output.args[0], selector, name, leaf=fx.Node)


def classifier_name(model: nn.Module, selector: int | str | None) -> str | None:
    """The qualified name of the Linear whose output forward returns as the logits (through
    reshapes and dropout), or None when the graph cannot tell (an untraceable forward,
    logits scaled after the layer, ...). Nothing is run."""
    try:
        graph = fx.symbolic_trace(model).graph
        node = _output_node(graph, selector, type(model).__name__)
    except Exception:  # any forward fx cannot follow: the caller falls back to module order
        return None
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, nn.Linear):
                return node.target
            if not isinstance(module, (*RESHAPE_MODULES, *DROPOUT_MODULES)):
                return None
        elif not ((node.op == "call_function" and node.target in RESHAPE_FUNCTIONS | DROPOUT_FUNCTIONS)
                  or (node.op == "call_method" and node.target in RESHAPE_METHODS)):
            return None
        node = node.args[0] if node.args else None
    return None


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's value."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module, garbage_collect_values=False)


# ----------------------------------------------------------------------------- the chain


def read_chain(model: nn.Module, input_shape: tuple[int, ...], output: int | str | None = None,
               batch: int = 2) -> Chain:
    """The model's computation as a chain of weight layers, checked node by node.

    The graph is run on a random probe of ``batch`` samples of ``input_shape`` (in the
    model's dtype and device) to learn each node's shape; its logits must equal those of
    ``model(probe)``, so the graph read is the computation the model performs."""
    graph_module = trace(model)
    reference = next(iter(model.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.float64
    device = reference.device if reference is not None else "cpu"
    probe = torch.randn(batch, *input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    recorder = _Recorder(graph_module)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same dropout masks (if any are drawn) in both runs
        try:
            recorder.run(probe)
        except GitoolError:
            raise
        except Exception as exc:
            raise GraphRefusal(f"the traced forward of {type(model).__name__} fails on a probe of shape "
                               f"{tuple(probe.shape)}: {type(exc).__name__}: {str(exc)[:160]}") from None
        torch.manual_seed(0)
        expected = model(probe)  # gitool's models give the logits (models.build_user_model); others: select
    from gitool.models import select_output

    if not isinstance(expected, torch.Tensor):
        expected = select_output(expected, output, type(model).__name__)
    values = recorder.env
    logits_node = _output_node(graph_module.graph, output, type(model).__name__)
    logits = values[logits_node]
    if not (isinstance(expected, torch.Tensor) and expected.shape == logits.shape
            and torch.allclose(expected, logits, rtol=1e-9, atol=1e-12)):
        raise GraphRefusal(f"the graph torch.fx reads from {type(model).__name__}.forward does not reproduce the "
                           "model's logits (does forward branch on the data?)")

    nodes = _path_to_input(logits_node, values, model)
    return _chain_of(nodes, values, model, batch)


def _tensor_inputs(node: fx.Node, values: dict) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if isinstance(values.get(arg), torch.Tensor)]


def _path_to_input(logits_node: fx.Node, values: dict, model: nn.Module) -> list[fx.Node]:
    """The nodes the logits depend on, in forward order, each checked to take exactly one
    tensor (so that they form one path from the input). The first node that cannot be
    inverted in forward order is the one named."""
    needed, stack = set(), [logits_node]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(_tensor_inputs(node, values))
    # leaves other than the input: parameters read with get_attr, tensors made in forward
    path = [node for node in logits_node.graph.nodes if node in needed and _tensor_inputs(node, values)]
    for node in path:
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        inputs = _tensor_inputs(node, values)
        if len(inputs) > 1:
            raise _refusal(node, model, f"combines {len(inputs)} tensors (a residual add, a concatenation, a "
                           "product with a parameter, or attention)")
        if inputs[0].op != "placeholder" and not _tensor_inputs(inputs[0], values):
            raise _refusal(node, model, f"takes a tensor the model holds or makes (node '{inputs[0].name}', "
                           f"{inputs[0].op} {inputs[0].target}) instead of the input's data")
        if not (isinstance(module, (nn.Linear, nn.Conv2d)) or _activation(node, module) is not None
                or _dropout(node, module) is not None or _is_reshape(node, module)):
            raise _refusal(node, model, _why_not(node, module))
    return path


def _chain_of(nodes: list[fx.Node], values: dict, model: nn.Module, batch: int) -> Chain:
    layers: list[ChainLayer] = []
    dropout: list[Dropout] = []
    used: dict[str, str] = {}
    for node in nodes:
        value = values[node]
        source = values[_tensor_inputs(node, values)[0]]
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
            raise _refusal(node, model, "does not keep the batch as its first dimension")
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if node.target in used:
                raise _refusal(node, model, f"uses module '{node.target}' a second time (first at node "
                               f"'{used[node.target]}'): its gradient sums both uses, which a layer-by-layer "
                               "inversion cannot split")
            used[node.target] = node.name
            padding = _conv_padding(node, module, model) if isinstance(module, nn.Conv2d) else (0, 0)
            layers.append(ChainLayer(name=node.target, node=node.name, module=module,
                                     input_shape=tuple(source.shape[1:]), output_shape=tuple(value.shape[1:]),
                                     padding=padding))
            continue
        activation = _activation(node, module)
        if activation is not None:
            if not layers:
                raise _refusal(node, model, "is an activation before the first Linear or Conv2d layer")
            if layers[-1].activation is not None:
                raise _refusal(node, model, "is a second activation after the same layer")
            layers[-1].activation, layers[-1].leaky_slope = activation
            continue
        step = _dropout(node, module)
        if step is not None:
            dropout.append(step)
        elif value.numel() != source.numel():  # a reshape (checked by _path_to_input)
            raise _refusal(node, model, "changes the number of values")
    if not layers or not isinstance(layers[-1].module, nn.Linear):
        raise GraphRefusal(f"the logits of {type(model).__name__} do not come out of a Linear layer; the analytic "
                           "methods need a linear classifier at the end")
    if layers[-1].activation is not None:
        raise GraphRefusal(f"the classifier '{layers[-1].name}' of {type(model).__name__} is followed by an "
                           f"activation ({layers[-1].activation}); forward must return the logits themselves")
    return Chain(layers, dropout)


def _activation(node: fx.Node, module: nn.Module | None) -> tuple[str, float] | None:
    """(activation name, leaky slope) of an activation node, else None."""
    if module is not None:
        name = ACTIVATION_MODULES.get(type(module))
        return (name, float(getattr(module, "negative_slope", 0.2))) if name else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        name = ACTIVATION_FUNCTIONS[node.target]
        slope = 0.2
        if name == "leakyrelu":
            arguments = _bound(node)
            slope = float(arguments.get("negative_slope", LEAKY_DEFAULT_SLOPE))
        return name, slope
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return ACTIVATION_METHODS[node.target], 0.2
    return None


def _dropout(node: fx.Node, module: nn.Module | None) -> Dropout | None:
    if module is not None:
        if isinstance(module, DROPOUT_MODULES):
            return Dropout(node.name, _operation(node, module), float(module.p), bool(module.training))
        return None
    if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
        arguments = _bound(node)
        return Dropout(node.name, _operation(node, None), float(arguments.get("p", 0.5)),
                       bool(arguments.get("training", True)))
    return None


def _is_reshape(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, RESHAPE_MODULES)
    return ((node.op == "call_function" and node.target in RESHAPE_FUNCTIONS)
            or (node.op == "call_method" and node.target in RESHAPE_METHODS))


def _bound(node: fx.Node) -> dict[str, Any]:
    """A function node's arguments by name, defaults filled in."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return dict(node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _conv_padding(node: fx.Node, conv: nn.Conv2d, model: nn.Module) -> tuple[int, int]:
    """A Conv2d the solvers can take (plain zero padding, no groups or dilation), with its
    padding as two numbers."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise _refusal(node, model, f"has groups={conv.groups}, dilation={tuple(conv.dilation)} or padding_mode="
                       f"'{conv.padding_mode}'; the conv solver takes plain zero-padded convolutions")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        kernel = tuple(conv.kernel_size)
        if any(k % 2 == 0 for k in kernel):
            raise _refusal(node, model, "pads 'same' with an even kernel, which pads one side more than the other")
        return (kernel[0] // 2, kernel[1] // 2)
    return tuple(int(p) for p in conv.padding)


def _operation(node: fx.Node, module: nn.Module | None) -> str:
    """The node's operation in a few words: "call_module MaxPool2d", "call_function add"."""
    if module is not None:
        return f"call_module {type(module).__name__}"
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{node.op} {name}"


def _why_not(node: fx.Node, module: nn.Module | None) -> str:
    if isinstance(module, POOLING) or node.target in POOLING_FUNCTIONS:
        return "is pooling, which discards what the inversion needs"
    if isinstance(module, NORMS) or node.target in (F.batch_norm, F.layer_norm, F.group_norm):
        return "is a normalisation layer (batch norm mixes the samples of a batch in train mode)"
    if isinstance(module, ATTENTION):
        return "is attention"
    if module is not None and list(module.children()) == [] and any(True for _ in module.parameters(False)):
        return "is a layer with weights the analytic methods do not know"
    if node.target in (operator.getitem,):
        return "takes an element of a value that is not the chain's tensor"
    return "is an operation the analytic methods cannot invert"


def _refusal(node: fx.Node, model: nn.Module, why: str) -> GraphRefusal:
    module = model.get_submodule(node.target) if node.op == "call_module" else None
    return GraphRefusal(f"node '{node.name}' ({_operation(node, module)}) {why}; {WHAT_WORKS}")
