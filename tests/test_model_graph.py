"""gitool.model_graph: a model's computation read with torch.fx as a chain of weight layers,
and the refusals that name the graph node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gitool.model_graph import GraphRefusal, classifier_name, read_chain

SHAPE = (3, 6, 6)


def chain_of(model, output=None, shape=SHAPE):
    return read_chain(model.double(), shape, output)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding="same")
        self.fc1 = nn.Linear(4 * 36, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = F.leaky_relu(self.conv(x))  # F.leaky_relu's default slope 0.01
        x = x.relu() if False else x  # a branch on a constant resolves at trace time
        x = torch.flatten(x, 1)
        x = torch.tanh(self.fc1(x))
        return self.fc2(x)


def test_functional_forward_gives_layers_activations_and_shapes():
    chain = chain_of(Functional())
    assert [layer.name for layer in chain.layers] == ["conv", "fc1", "fc2"]
    assert [layer.activation for layer in chain.layers] == ["leakyrelu", "tanh", None]
    assert chain.layers[0].leaky_slope == 0.01
    assert chain.layers[0].padding == (1, 1)  # 'same' with a 3x3 kernel
    assert chain.layers[0].input_shape == (3, 6, 6) and chain.layers[0].output_shape == (4, 6, 6)
    assert chain.layers[1].input_shape == (144,) and chain.classifier.name == "fc2"


def test_one_activation_module_at_several_places_and_sequential_names():
    act = nn.LeakyReLU(0.3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, padding=1), act, nn.Flatten(),
                          nn.Linear(144, 5))
    chain = chain_of(model)
    assert [(layer.name, layer.activation, layer.leaky_slope) for layer in chain.layers] == [
        ("0", "leakyrelu", 0.3), ("2", "leakyrelu", 0.3), ("5", None, 0.2)]
    # what the old walk over named_modules() saw: the shared activation once
    assert [name for name, _ in model.named_modules()].count("1") == 1 and "3" not in dict(model.named_modules())


class Selected(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(108, 8)
        self.head = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 2)  # registered after the classifier

    def forward(self, x, return_all=False):
        z = torch.sigmoid(self.body(x.view(x.size(0), -1)))
        return {"logits": self.head(z), "aux": self.aux(z), "z": z}


def test_the_output_selector_picks_the_logits_and_the_classifier():
    chain = chain_of(Selected(), "logits")
    assert [layer.name for layer in chain.layers] == ["body", "head"]
    assert classifier_name(Selected(), "logits") == "head"
    assert classifier_name(Selected(), "aux") == "aux"
    with pytest.raises(GraphRefusal, match=r"the classifier 'body' of Selected is followed by an activation"):
        chain_of(Selected(), "z")
    from gitool.errors import GitoolError

    with pytest.raises(GitoolError, match=r"forward returns a dict \(logits: tensor 2x5, aux: tensor 2x2, z: "
                                          r"tensor 2x8\); pass --model-output KEY"):
        chain_of(Selected())


class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(108, 8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(F.dropout(x, 0.2, self.training))


def test_dropout_is_reported_with_its_mode():
    model = Dropouts().double()
    chain = read_chain(model.eval(), SHAPE)
    assert [(d.node, d.p, d.training) for d in chain.dropout] == [("drop", 0.5, False), ("dropout", 0.2, False)]
    chain = read_chain(model.train(), SHAPE)
    assert [d.training for d in chain.dropout] == [True, True]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 8)
        self.b = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.c = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a(x.flatten(1))
        x = self.bn(x + self.b(x))
        return self.c(x)


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 5)

    def forward(self, x):
        return torch.sigmoid(self.a(x.flatten(1)))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 5)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot follow it
            x = -x
        return self.a(x.flatten(1))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.a(x.flatten(1) * self.scale)


class BatchMixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(216, 5)

    def forward(self, x):
        return self.a(x.reshape(-1, 216))  # two samples become one row


class EvenSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 2, padding="same")
        self.a = nn.Linear(72, 5)

    def forward(self, x):
        return self.a(self.conv(x).flatten(1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, groups=3)
        self.a = nn.Linear(48, 5)

    def forward(self, x):
        return self.a(self.conv(x).flatten(1))


class DoubleActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 8)
        self.b = nn.Linear(8, 5)

    def forward(self, x):
        return self.b(torch.sigmoid(F.relu(self.a(x.flatten(1)))))


class ActivationFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(108, 5)

    def forward(self, x):
        return self.a(torch.tanh(x).flatten(1))


@pytest.mark.parametrize("model,message", [
    (Residual(), r"^node 'add' \(call_function add\) combines 2 tensors"),  # first in forward order, before bn
    (Softmaxed(), r"the classifier 'a' of Softmaxed is followed by an activation \(sigmoid\)"),
    (Branching(), r"^cannot read the forward of Branching with torch\.fx \(TraceError"),
    (Scaled(), r"^node 'mul' \(call_function mul\) combines 2 tensors \(a residual add, a concatenation, a product "
               "with a parameter"),
    (BatchMixing(), r"^node 'reshape' \(call_method reshape\) does not keep the batch as its first dimension"),
    (EvenSame(), r"^node 'conv' \(call_module Conv2d\) pads 'same' with an even kernel"),
    (Grouped(), r"^node 'conv' \(call_module Conv2d\) has groups=3"),
    (DoubleActivation(), r"^node 'sigmoid' \(call_function sigmoid\) is a second activation after the same layer"),
    (ActivationFirst(), r"^node 'tanh' \(call_function tanh\) is an activation before the first Linear"),
    (nn.Sequential(nn.Conv2d(3, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 5)),
     r"^node '_1' \(call_module MaxPool2d\) is pooling"),
    (nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.GELU(), nn.Linear(8, 5)),
     r"^node '_2' \(call_module GELU\) is an operation the analytic methods cannot invert; the analytic methods "
     "invert chains of Linear and Conv2d layers"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_what_cannot_be_inverted_is_refused_by_node(model, message):
    with pytest.raises(GraphRefusal, match=message):
        chain_of(model)


def test_an_untraceable_model_has_no_classifier_name_and_module_order_decides():
    from gitool.models import last_linear

    assert classifier_name(Branching(), None) is None
    assert classifier_name(Softmaxed(), None) is None  # logits scaled after the layer: the graph cannot tell
    model = Branching()
    assert last_linear(model) is model.a
