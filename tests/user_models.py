"""Models written the way users write them, for tests/test_user_models.py.

The tests copy this file into a scratch folder as ``usernets.py`` and name its factories
on the command line (``gitool import --model usernets:functional_mlp ...``), as a user
would with their own module. Each factory takes ``num_classes`` and ``input_shape``.
Nothing here is written for gitool: functional activations, one activation module used
at several places, ``x.view``, ``torch.flatten``, dropout, tuples and dicts returned.

The two models shaped like the papers' published ones are written from the papers'
descriptions: the R-CONV LeNet (Eltaras et al.: three 5x5 convolutions with padding 2
and strides 2, 2, 1 to 12 channels, one activation module shared by all of them, a
linear classifier, ``forward`` returning ``(out, x)``) and the RLU LeNet5 (Chen and
Vikalo: two 5x5 convolutions with max pooling, fully-connected 120 and 84, the 84-wide
embedding returned beside the logits).
"""

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalMLP(nn.Module):
    """Activations called as functions in forward, torch.flatten."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.fc1 = nn.Linear(c * h * w, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        return self.fc3(x)


def functional_mlp(num_classes=10, input_shape=(3, 8, 8)):
    return FunctionalMLP(num_classes, input_shape)


class SharedActivationCNN(nn.Module):
    """One LeakyReLU module used after every layer; leaky_relu as a function too."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding="same")
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(8 * h * w, num_classes)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.head(x.flatten(1))


def shared_activation_cnn(num_classes=10, input_shape=(3, 8, 8)):
    return SharedActivationCNN(num_classes, input_shape)


def sequential_mlp(num_classes=10, input_shape=(3, 8, 8)):
    """A bare nn.Sequential, the shortest model there is."""
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 48), nn.Tanh(), nn.Linear(48, num_classes))


class ViewFlattenCNN(nn.Module):
    """x.view(x.size(0), -1) before the classifier, torch.relu as a function."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.conv = nn.Conv2d(c, 16, 3, stride=1, padding=1)
        self.fc = nn.Linear(16 * h * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        return self.fc(x)


def view_flatten_cnn(num_classes=10, input_shape=(3, 8, 8)):
    return ViewFlattenCNN(num_classes, input_shape)


class DropoutMLP(nn.Module):
    """Dropout as a module and as a function; the client trains in eval mode."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.fc1 = nn.Linear(c * h * w, 64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.drop(F.relu(self.fc1(x.reshape(x.shape[0], -1))))
        x = F.dropout(torch.tanh(self.fc2(x)), 0.3, self.training)
        return self.out(x)


def dropout_mlp(num_classes=10, input_shape=(3, 8, 8)):
    return DropoutMLP(num_classes, input_shape)


class DictOutputMLP(nn.Module):
    """Returns a dict; a projection head registered after the classifier (so the last
    Linear in module order is not the classifier)."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Linear(c * h * w, 40), nn.Sigmoid())
        self.classifier = nn.Linear(40, num_classes)
        self.projection = nn.Linear(40, 16)

    def forward(self, x):
        features = self.body(x.flatten(1))
        return {"logits": self.classifier(features), "projection": self.projection(features)}


def dict_output_mlp(num_classes=10, input_shape=(3, 8, 8)):
    return DictOutputMLP(num_classes, input_shape)


class RConvLeNet(nn.Module):
    """The R-CONV paper's LeNet: one activation module at three places, (out, x) returned."""

    def __init__(self, num_classes, input_shape, activation):
        super().__init__()
        c, h, w = input_shape
        act = activation
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=5 // 2, stride=2),
            act,
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2),
            act,
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1),
            act,
        )
        self.fc = nn.Sequential(nn.Linear(12 * ((h + 3) // 4) * ((w + 3) // 4), num_classes))

    def forward(self, x):
        out = self.body(x)
        x = out.view(out.size(0), -1)
        out = self.fc(x)
        return out, x


def rconv_lenet(num_classes=10, input_shape=(3, 32, 32)):
    return RConvLeNet(num_classes, input_shape, nn.LeakyReLU(0.2))


class RluLeNet5(nn.Module):
    """The RLU paper's LeNet5: (logits, embedding)."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side_h * side_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        embedding = F.relu(self.fc2(x))
        return self.fc3(embedding), embedding


def rlu_lenet5(num_classes=10, input_shape=(3, 32, 32)):
    return RluLeNet5(num_classes, input_shape)


class ResidualMLP(nn.Module):
    """A skip connection: the analytic methods must refuse it, naming the add."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.inp = nn.Linear(c * h * w, 32)
        self.block = nn.Linear(32, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.inp(x.flatten(1)))
        x = x + F.relu(self.block(x))
        return self.out(x)


def residual_mlp(num_classes=10, input_shape=(3, 8, 8)):
    return ResidualMLP(num_classes, input_shape)


class TwiceUsedLinear(nn.Module):
    """One Linear layer applied twice: its gradient sums both uses."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.inp = nn.Linear(c * h * w, 24)
        self.mid = nn.Linear(24, 24)
        self.out = nn.Linear(24, num_classes)

    def forward(self, x):
        x = torch.tanh(self.inp(x.flatten(1)))
        x = torch.tanh(self.mid(x))
        x = torch.tanh(self.mid(x))
        return self.out(x)


def twice_used_linear(num_classes=10, input_shape=(3, 8, 8)):
    return TwiceUsedLinear(num_classes, input_shape)
