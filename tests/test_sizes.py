"""The size yardsticks: dense bytes from shapes equal the real safetensors file."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save
from torch import nn
from torch.nn.utils import prune
from toys import tiny_vgg

from rclib.compress import sizes
from rclib.nn import masks


def test_safetensors_bytes_equal_the_real_file_for_mixed_dtypes_and_shapes():
    rng = random.Random(0)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
    for _ in range(200):  # dtype order and offset digits decide the header length
        tensors = {f"{rng.choice('abcxyz')}.{i}": torch.zeros(
            [rng.choice([0, 1, 3, 7, 31, 100]) for _ in range(rng.randint(0, 3))], dtype=rng.choice(dtypes))
            for i in range(rng.randint(1, 8))}
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        assert sizes.safetensors_bytes(shapes) == len(save(tensors))


def test_dense_bytes_equal_serialised_effective_state_of_pruned_models():
    model = tiny_vgg()  # BatchNorm: int64 num_batches_tracked beside float32
    prune.global_unstructured([(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                              pruning_method=prune.L1Unstructured, amount=0.5)
    seq = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).double()
    for m in (model, seq):
        assert sizes.dense_bytes(m) == len(save(masks.effective_state(m)))


def test_effective_nonzero_counts_the_masked_weight_without_building_it():
    """Chunked count equals count_nonzero(orig * mask), also where the kept weight is itself 0
    and across chunk borders."""
    from torch.nn.utils import prune as torch_prune


    layer = torch.nn.Linear(300, 7000)  # 2.1M weights: three chunks
    with torch.no_grad():
        layer.weight[0, :50] = 0.0  # kept by the mask below but zero all the same
    g = torch.Generator().manual_seed(0)
    torch_prune.custom_from_mask(layer, "weight", torch.rand(layer.weight.shape, generator=g) > 0.4)
    expected = int(torch.count_nonzero(layer.weight_orig * layer.weight_mask))
    assert masks.effective_nonzero(layer) == expected
    assert masks.effective_nonzero(layer, "bias") == int(torch.count_nonzero(layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8])
def test_count_nonzero_matches_torch(dtype):

    t = (torch.randn(1000) * (torch.rand(1000) > 0.3)).to(dtype)
    assert masks.count_nonzero(t) == int(torch.count_nonzero(t))
