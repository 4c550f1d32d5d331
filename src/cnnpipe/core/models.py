"""The model zoo. Every model is built for the dataset's (C, H, W) and number of classes.

lenet, simplecnn, cifarnet and cnn are the tutorials' architectures, sized to any input;
bncnn is a batch-norm CNN that beats them on Fashion-MNIST at a few times LeNet's cost;
rescnn, our default, is three of airbench's residual groups: the most accuracy per second of CPU training of
these on Fashion-MNIST (docs/benchmarks.md);
airnet is an airbench-style residual net for 32×32 colour images (GPU-sized).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnpipe.core.errors import CnnpipeError

Shape = tuple[int, int, int]  # C, H, W


class Classifier(nn.Module):
    """features -> flatten -> head, with the head's input size measured on a dummy image (in eval mode:
    batch norm can neither fail on one image's 1×1 maps nor count the dummy pass in its statistics)."""

    def __init__(self, features: nn.Module, head: Callable[[int], nn.Module], in_shape: Shape):
        super().__init__()
        self.features = features
        with torch.no_grad():
            n = features.eval()(torch.zeros(1, *in_shape)).flatten(1).shape[1]
        features.train()
        self.head = head(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N×C×H×W -> N×classes
        x = self.features(x)
        if x.requires_grad and _channels_last_only(x) and not torch.compiler.is_compiling():
            x.register_hook(_to_channels_last)  # under torch.compile the compiler chooses the layouts
        return self.head(x.flatten(1))


def _channels_last_only(x: torch.Tensor) -> bool:
    """x is an N×C×H×W tensor laid out channels-last, and not also plain contiguous (as N×C×1×1 ones are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    """flatten(1) of channels-last features is a copy in N×C×H×W order, so its gradient comes back in that
    order; every backward kernel of the features would then see two memory formats (their slow path in
    GELU and batch norm). Handing the gradient back channels-last keeps the whole backward pass in one."""
    return grad.contiguous(memory_format=torch.channels_last)


def lenet(in_shape: Shape, num_classes: int) -> nn.Module:
    """Tutorial 000: LeNet with 20/50 channels and a 500-unit hidden layer."""
    # The tutorial applies ReLU then pools; pooling first is the same function (ReLU is monotonic) with ReLU on a
    # quarter of the values, so faster (docs/benchmarks.md).
    c = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 28 -> 24 -> 12
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 12 -> 8 -> 4
    )
    return Classifier(features, lambda n: nn.Sequential(
        nn.Linear(n, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes)), in_shape)


def simplecnn(in_shape: Shape, num_classes: int) -> nn.Module:
    """Tutorial 001: two 3×3 conv blocks (32, 64), a 128-unit layer with dropout."""
    c = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
    )
    return Classifier(features, lambda n: nn.Sequential(
        nn.Linear(n, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes)), in_shape)


def cifarnet(in_shape: Shape, num_classes: int) -> nn.Module:
    """Tutorial 003: the classic CIFAR-10 tutorial net (6/16 channels, 120-84 head)."""
    c = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 28 -> 14
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 10 -> 5
    )
    return Classifier(features, lambda n: nn.Sequential(
        nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)), in_shape)


def cnn(in_shape: Shape, num_classes: int) -> nn.Module:
    """Tutorial 004: two padded 3×3 convs (16, 32) and a 64-unit layer."""
    c = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
    )
    return Classifier(features, lambda n: nn.Sequential(
        nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, num_classes)), in_shape)


def _conv_pool_bn(cin: int, cout: int) -> nn.Sequential:
    # Pool before BN and ReLU (as airbench): same function, BN on a quarter of the activations.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(cout), nn.ReLU())


def bncnn(in_shape: Shape, num_classes: int) -> nn.Module:
    """Three conv-BN-ReLU-pool blocks (32, 64, 128) and a dropout linear head (~7.5 MMAC at 28×28)."""
    c = in_shape[0]
    features = nn.Sequential(
        _conv_pool_bn(c, 32),  # 28 -> 14
        _conv_pool_bn(32, 64),  # 14 -> 7
        _conv_pool_bn(64, 128),  # 7 -> 3
    )
    return Classifier(features, lambda n: nn.Sequential(nn.Dropout(0.25), nn.Linear(n, num_classes)), in_shape)


class ConvGroup(nn.Module):
    """airbench's block: conv, pool, BN, GELU, then conv, BN, GELU with a residual connection around it."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N×cin×H×W -> N×cout×H/2×W/2
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return x + self.act(self.norm2(self.conv2(x)))


def rescnn(in_shape: Shape, num_classes: int) -> nn.Module:
    """Three residual groups (32, 64, 128; ~12 MMAC at 28×28) and a dropout linear head."""
    c = in_shape[0]
    features = nn.Sequential(
        ConvGroup(c, 32),  # 28 -> 14
        ConvGroup(32, 64),  # 14 -> 7
        ConvGroup(64, 128),  # 7 -> 3
    )
    return Classifier(features, lambda n: nn.Sequential(nn.Dropout(0.25), nn.Linear(n, num_classes)), in_shape)


def airnet(in_shape: Shape, num_classes: int) -> nn.Module:
    """airbench94's network for 32×32 colour images (widths 64/256/256, ~0.4 GMAC at 32×32) with residual
    connections as in airbench96; a learned 3×3 stem replaces the data-dependent whitening layer."""
    c = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.GELU(),
        ConvGroup(32, 64),  # 32 -> 16
        ConvGroup(64, 256),  # 16 -> 8
        ConvGroup(256, 256),  # 8 -> 4
        nn.AdaptiveMaxPool2d(1),
    )
    return Classifier(features, lambda n: nn.Linear(n, num_classes, bias=False), in_shape)


MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "lenet": lenet,
    "simplecnn": simplecnn,
    "cifarnet": cifarnet,
    "cnn": cnn,
    "bncnn": bncnn,
    "rescnn": rescnn,
    "airnet": airnet,
}


def build_model(name: str, in_shape: Shape, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise CnnpipeError(f"unknown model '{name}'; set train.model to one of: {', '.join(MODELS)}")
    try:
        return MODELS[name](tuple(in_shape), num_classes)
    except (RuntimeError, ValueError) as e:
        c, h, w = in_shape
        raise CnnpipeError(
            f"model '{name}' does not fit {h}×{w} images ({str(e).splitlines()[0]}); "
            "use larger images or another train.model"
        ) from e


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by bn (eval mode) as one conv with bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy with BatchNorm folded into the preceding conv: conv-BN and, where every BN scale
    is positive (max-pool then commutes with the affine map), conv-pool-BN. Same function, fewer ops, and
    int8 quantization no longer has to quantize the conv output before BN rescales it."""
    import copy

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        i = 0
        while i < len(layers):
            conv = layers[i]
            if isinstance(conv, nn.Conv2d):
                if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    layers[i: i + 2] = [_fold_into_conv(conv, layers[i + 1])]
                elif (i + 2 < len(layers) and isinstance(layers[i + 1], nn.MaxPool2d)
                      and isinstance(layers[i + 2], nn.BatchNorm2d)):
                    if _positive_scale(layers[i + 2]):
                        layers[i: i + 3] = [_fold_into_conv(conv, layers[i + 2]), layers[i + 1]]
            i += 1
        if len(layers) != len(module):
            for name in list(module._modules):
                del module._modules[name]
            for j, layer in enumerate(layers):
                module.add_module(str(j), layer)
    for group in [m for m in model.modules() if isinstance(m, ConvGroup)]:
        group.conv2, group.norm2 = _fold_into_conv(group.conv2, group.norm2), nn.Identity()
        if _positive_scale(group.norm1):  # conv, pool, BN: pool commutes with a positive affine map
            group.conv1, group.norm1 = _fold_into_conv(group.conv1, group.norm1), nn.Identity()
    return model


def _positive_scale(bn: nn.BatchNorm2d) -> bool:
    return bool((bn.weight / torch.sqrt(bn.running_var + bn.eps) > 0).all())
