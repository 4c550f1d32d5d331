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
