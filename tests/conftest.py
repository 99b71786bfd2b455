import pytest
import torch

from diffnb.models import tiny_pipeline


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def tiny(request):
    return tiny_pipeline(request.param)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)
