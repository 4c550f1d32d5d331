import pytest
import torch

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_gives_one_logit_per_class(name, shape):
    model = build_model(name, shape, 10).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_follow_num_classes(name):
    assert build_model(name, (1, 28, 28), 4)(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_unknown_model_lists_choices():
    with pytest.raises(CnnpipeError, match=r"unknown model 'resnet9000'.*lenet"):
        build_model("resnet9000", (1, 28, 28), 10)


def test_model_too_big_for_images():
    with pytest.raises(CnnpipeError, match=r"model 'lenet' does not fit 8×8 images"):
        build_model("lenet", (1, 8, 8), 10)
    for name in ("bncnn", "rescnn", "airnet"):  # with batch norm: one line too, not a traceback
        with pytest.raises(CnnpipeError, match=rf"model '{name}' does not fit 4×4 images.*larger images"):
            build_model(name, (3, 4, 4), 10)


@pytest.mark.parametrize("name", ["bncnn", "rescnn", "airnet"])
def test_batch_norm_models_build_for_small_images_and_start_with_clean_statistics(name):
    """Sizing the head runs one dummy image through the features: in eval mode, so batch norm takes 1×1 maps
    and its statistics count no pass; the model comes back in training mode."""
    model = build_model(name, (3, 12, 12), 10)
    assert model.training and all(m.training for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 and not m.running_mean.any() for m in norms)
    assert model(torch.randn(2, 3, 12, 12)).shape == (2, 10)


def test_training_flops_per_image_match_a_hand_count():
    """bench train's part (e) divides the engine's FLOP rate by a matmul peak: the count must be right.
    bncnn at 28×28: forward MACs of three 3×3 convs and the head; training ≈ 3 × forward (the first conv
    needs no input gradient, hence slightly less)."""
    from cnnpipe.bench.train import train_flops_per_image
    from cnnpipe.core.models import build_model

    macs = 28 * 28 * 1 * 32 * 9 + 14 * 14 * 32 * 64 * 9 + 7 * 7 * 64 * 128 * 9 + 128 * 3 * 3 * 10
    model = build_model("bncnn", (1, 28, 28), 10).to(memory_format=torch.channels_last)
    flops = train_flops_per_image(model, (1, 28, 28))
    assert 3 * 2 * macs - 2 * 28 * 28 * 32 * 9 <= flops <= 3 * 2 * macs * 1.01


def _randomize_batchnorm(model: torch.nn.Module, negative: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        n = bn.num_features
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g))
            if negative:
                bn.weight[0] = -1.0


@pytest.mark.parametrize("name, shape", [("bncnn", (1, 28, 28)), ("rescnn", (1, 28, 28)), ("airnet", (3, 32, 32))])
def test_fold_batchnorm_keeps_the_function_and_removes_the_norms(name, shape):
    """Export folds BN into the convs before it (also across a max-pool where every scale is positive): the
    same logits with no BatchNorm left; a negative scale after a pool keeps that BN, still the same function."""
    from cnnpipe.core.models import fold_batchnorm

    x = torch.randn(4, *shape)
    for negative in (False, True):
        model = build_model(name, shape, 10)
        _randomize_batchnorm(model, negative)
        model.eval()
        folded = fold_batchnorm(model)
        norms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            assert torch.allclose(folded(x), model(x), atol=1e-4)
        if negative:
            assert norms  # a pool then a BN with a negative scale do not commute: that BN stays
        else:
            assert not norms


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_backward_pass_keeps_the_features_memory_format(channels_last):
    """The head flattens N×C×H×W; in channels-last training its gradient must come back channels-last, or
    every backward kernel of the features mixes two memory formats (their slow path). Plain layout stays
    plain."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("rescnn", (1, 28, 28), 10).to(memory_format=fmt)
    seen = []
    model.features[-1].norm2.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0]))
    model(torch.randn(4, 1, 28, 28).contiguous(memory_format=fmt)).sum().backward()
    assert seen[0].is_contiguous(memory_format=fmt)
    assert seen[0].is_contiguous() != channels_last
