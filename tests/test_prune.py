"""rclib.compress.prune (Alg 1-5) on tiny VGG-topology models, as Torch-Pruning tests its toy nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset
from toys import SPEC  # noqa: E402

from rclib.compress import harden, iterative, prune, sizes
from rclib.nn import masks, models, train
from rclib.nn.train import Optimiser


def tiny(seed: int = 0, batch_norm: bool = True, **changes) -> models.VGG:
    """A small VGG whose biases and BatchNorm statistics are all non-zero, so that a channel
    that is only partly removed shows up as a difference (zero biases would hide it)."""
    torch.manual_seed(seed)
    model = models.from_spec({**SPEC, "batch_norm": batch_norm, **changes})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def mask_tensors(model):
    return [m.weight_mask for _, m in models.prunable_layers(model)]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.97])
def test_global_masks_equal_torch(rate):
    ours, theirs = tiny(), tiny()
    prune.global_unstructured(ours, rate)
    torch_prune.global_unstructured([(m, "weight") for _, m in models.prunable_layers(theirs)],
                                    pruning_method=torch_prune.L1Unstructured, amount=rate)
    for a, b in zip(mask_tensors(ours), mask_tensors(theirs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rate", [0.2, 0.75])
def test_layer_masks_equal_torch(rate):
    ours, theirs = tiny(), tiny()
    prune.layer_unstructured(ours, rate)
    for _, m in models.prunable_layers(theirs):
        torch_prune.l1_unstructured(m, "weight", amount=rate)
    for a, b in zip(mask_tensors(ours), mask_tensors(theirs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.8, 0.95])
def test_exact_zero_counts(rate):
    g, layer = tiny(), tiny()
    prune.global_unstructured(g, rate)
    table = prune.sparsity(g)
    assert table["zeros"].sum() == round(rate * table["weights"].sum())
    prune.layer_unstructured(layer, rate)
    table = prune.sparsity(layer)
    assert (table["zeros"] == [round(rate * n) for n in table["weights"]]).all()
    # biases are not pruned by the unstructured methods
    assert all(m.bias.ne(0).all() for _, m in models.prunable_layers(g))


def test_rates_are_absolute_when_pruning_again():
    model = tiny()
    prune.global_unstructured(model, 0.5)
    zeros_before = mask_tensors(model)
    prune.global_unstructured(model, 0.8)
    table = prune.sparsity(model)
    assert table["zeros"].sum() == round(0.8 * table["weights"].sum())
    # what was pruned stays pruned
    for before, after in zip(zeros_before, mask_tensors(model)):
        assert not (after.bool() & ~before.bool()).any()


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.9])
def test_channel_pruning_removes_whole_channels_only(rate):
    model = tiny()
    original = {n: m.weight.detach().clone() for n, m in models.prunable_layers(model)}
    prune.channel_structured(model, rate)
    layers = models.prunable_layers(model)
    for name, m in layers[:-1]:
        w = m.weight.detach().flatten(1)
        dead = w.eq(0).all(1)
        n = w.shape[0]
        assert int(dead.sum()) == min(round(rate * n), n - 1)
        # surviving channels are untouched, dead ones are zero with their bias
        assert torch.equal(w[~dead], original[name].flatten(1)[~dead])
        assert m.bias[dead].eq(0).all() and m.bias[~dead].ne(0).all()
        # the smallest-L1 channels are the ones removed
        norms = original[name].abs().flatten(1).sum(1)
        assert norms[dead].max() <= norms[~dead].min()
    name, out = layers[-1]
    assert torch.equal(out.weight.detach(), original[name]), "the output layer must never be pruned"


def test_channel_pruning_masks_the_following_batchnorm():
    model = tiny()
    prune.channel_structured(model, 0.5)
    conv, bn = model.features[0], model.features[1]
    dead = conv.weight.detach().flatten(1).eq(0).all(1)
    assert bn.weight[dead].eq(0).all() and bn.bias[dead].eq(0).all()
    model.train()
    with torch.no_grad():
        act = model.features[:3](model.normalize(torch.rand(8, 1, 8, 8)))
    assert act[:, dead].eq(0).all(), "a pruned channel must emit exactly zero, also in train mode"


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_harden_is_equivalent_and_smaller(rate, batch_norm):
    model = tiny(batch_norm=batch_norm)
    prune.channel_structured(model, rate)
    hard = harden.harden(model)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(hard(x), model(x), atol=1e-5, rtol=0)
    assert not torch_prune.is_pruned(hard)
    assert models.count_parameters(hard) < sizes.nonzero_parameters(model) + 10 * 64
    assert sizes.dense_bytes(hard) < 0.7 * sizes.dense_bytes(model)
    assert harden.flops(hard, (1, 8, 8)) < harden.flops(model, (1, 8, 8))
    # the hardened model can be rebuilt from its spec alone
    rebuilt = models.from_spec(hard.spec)
    rebuilt.load_state_dict(hard.state_dict())
    assert torch.equal(rebuilt.eval()(x), hard(x))


def test_harden_torchvision_vgg16_bn_layout():
    """torchvision's vgg16_bn: BatchNorm after every conv and a 7x7 avgpool, so the first linear
    layer has 49 input columns per channel (its layout at 1/4 width, as ``width`` scales it)."""
    torch.manual_seed(0)
    model = models.from_spec(dict(model="vgg16", width=16, hidden=256, batch_norm=True, dropout=0.5,
                                  num_classes=10, input_shape=[3, 32, 32], mean=[0.5] * 3,
                                  std=[0.5] * 3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
    prune.channel_structured(model, 0.5, layers=[n for n, _ in models.prunable_layers(model)][:13])
    hard = harden.harden(model)
    assert hard.classifier[0].in_features == 64 * 49  # 128 channels of the last block, half kept
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hard(x), model(x), atol=1e-5, rtol=1e-4)
    # conv widths halve and the first linear layer loses half its 6272 input columns
    assert models.count_parameters(hard) < 0.55 * models.count_parameters(model)


def _loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


@pytest.mark.parametrize("method", ["global", "channel"])
def test_iterative_keeps_pruned_weights_at_zero(method):
    model = tiny()
    loader = _loader()
    seen = []

    def retrain(m):
        train.fit(m, loader, 1, optimiser=Optimiser("sgd", lr=0.05, weight_decay=0.005), progress=False)

    def check(m, rate):
        # every weight pruned at an earlier step is still exactly zero after retraining
        zeros = [l.weight.detach().eq(0) for _, l in models.prunable_layers(m)]
        for before, now in zip(seen[-1] if seen else [], zeros):
            assert now[before].all()
        seen.append(zeros)

    result = iterative.iterative(model, 0.5, 0.2, retrain, method=method, on_step=check)
    assert len(seen) == 3  # 0.2, 0.4, 0.5
    if method == "channel":
        assert isinstance(result, models.VGG) and result is not model and not torch_prune.is_pruned(result)
        x = torch.rand(8, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(result(x), model(x), atol=1e-5, rtol=0)
    else:
        assert result is model
        table = prune.sparsity(model)
        assert table["zeros"].sum() == round(0.5 * table["weights"].sum())


def test_schedule():
    assert iterative.schedule(0.5, 0.2) == [0.2, 0.4, 0.5]
    assert iterative.schedule(0.3, 0.1) == [0.1, 0.2, 0.3]
    assert iterative.schedule(0.9, 0.5, extra=[0.7, 0.3, 0.95]) == [0.3, 0.5, 0.7, 0.9]


def test_make_permanent_keeps_zeros_and_drops_masks():
    model = tiny()
    prune.channel_structured(model, 0.5)
    before = prune.sparsity(model)
    masks.make_permanent(model)
    assert not torch_prune.is_pruned(model)
    assert (prune.sparsity(model)["zeros"] == before["zeros"]).all()
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, "0.5", True, float("nan")])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        prune.global_unstructured(tiny(), rate)


def test_bad_method_layers_and_model():
    with pytest.raises(ValueError, match="method.*global, layer, channel"):
        prune.prune(tiny(), "random", 0.5)
    with pytest.raises(ValueError, match="layers.*features.99"):
        prune.layer_unstructured(tiny(), 0.5, layers=["features.99"])
    with pytest.raises(ValueError, match="step"):
        iterative.iterative(tiny(), 0.5, 0.0, lambda m: None)
    with pytest.raises(ValueError, match="harden needs an rclib.nn.models.VGG"):
        harden.harden(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="empty"):
        prune.global_unstructured(nn.Sequential(nn.ReLU()), 0.5)


def test_works_on_any_model():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    prune.global_unstructured(net, 0.6)
    assert prune.sparsity(net)["zeros"].sum() == round(0.6 * (64 * 32 + 32 * 10))


def test_mask_agreement_allows_differences_only_at_exact_ties():
    def both(model):
        ours, theirs = masks.clone(model), masks.clone(model)
        prune.global_unstructured(ours, 0.5)
        torch_prune.global_unstructured([(m, "weight") for _, m in models.prunable_layers(theirs)],
                                        pruning_method=torch_prune.L1Unstructured, amount=0.5)
        return ours, theirs

    tied = models.from_spec(SPEC)
    with torch.no_grad():  # every magnitude equal: which weights go is an arbitrary choice
        for _, m in models.prunable_layers(tied):
            m.weight.copy_(torch.sign(torch.randn_like(m.weight)))
    result = masks.mask_agreement(*both(tied))
    assert result["agree"] and result["zeros_ours"] == result["zeros_theirs"]

    torch.manual_seed(0)
    ours, theirs = both(models.from_spec(SPEC))
    assert masks.mask_agreement(ours, theirs) == dict(zeros_ours=result["zeros_ours"],
                                                      zeros_theirs=result["zeros_ours"], differ=0,
                                                      ties_only=True, agree=True)
    # swap the largest kept weight with a pruned one: equal counts, a difference far from any tie
    _, m = models.prunable_layers(theirs)[0]
    mask, w = m.weight_mask.view(-1), m.weight_orig.detach().abs().view(-1)
    largest = int(torch.where(mask.bool(), w, torch.zeros_like(w)).argmax())
    dropped = int((mask == 0).nonzero()[0])
    with torch.no_grad():
        mask[largest], mask[dropped] = 0.0, 1.0
    swapped = masks.mask_agreement(ours, theirs)
    assert swapped["zeros_ours"] == swapped["zeros_theirs"] and swapped["differ"] == 2
    assert not swapped["ties_only"] and not swapped["agree"]


@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_global_ties_follow_the_concatenated_keep_mask(rate):
    model = tiny()
    with torch.no_grad():  # a coarse grid: many weights tie with the threshold
        for _, m in models.prunable_layers(model):
            m.weight.copy_(torch.round(m.weight * 20) / 20)
    scores = np.concatenate([m.weight.detach().abs().numpy().ravel() for _, m in models.prunable_layers(model)])
    expected = prune._keep_mask(scores, round(rate * scores.size))
    prune.global_unstructured(model, rate)
    got = np.concatenate([m.weight_mask.numpy().ravel() for _, m in models.prunable_layers(model)])
    assert np.array_equal(got.astype(bool), expected)


def test_fast_mask_is_torchs_reparametrisation():
    ours, theirs = tiny(), tiny()
    prune.global_unstructured(ours, 0.5)
    for (_, a), (_, b) in zip(models.prunable_layers(ours), models.prunable_layers(theirs)):
        torch_prune.custom_from_mask(b, "weight", a.weight_mask)
        assert torch_prune.is_pruned(a)
        assert [type(h) for h in a._forward_pre_hooks.values()] == [type(h) for h in b._forward_pre_hooks.values()]
        assert sorted(n for n, _ in a.named_parameters()) == sorted(n for n, _ in b.named_parameters())
        assert sorted(n for n, _ in a.named_buffers()) == sorted(n for n, _ in b.named_buffers())
        assert torch.equal(a.weight, b.weight) and a.weight_mask.dtype == b.weight_mask.dtype
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(ours(x), theirs(x))
    first = [m.weight_mask.clone() for _, m in models.prunable_layers(ours)]
    prune.global_unstructured(ours, 0.8)  # a second mask combines with the first
    for (_, m), old in zip(models.prunable_layers(ours), first):
        assert torch.equal(m.weight_mask, m.weight_mask * old)  # never revives a pruned weight
        assert torch.equal(m.weight, m.weight_orig * m.weight_mask)
    assert 0.79 < 1 - sum(m.weight_mask.sum().item() for _, m in models.prunable_layers(ours)) / \
        sum(m.weight_mask.numel() for _, m in models.prunable_layers(ours)) < 0.81
    for _, m in models.prunable_layers(ours):
        torch_prune.remove(m, "weight")
    assert not any(torch_prune.is_pruned(m) for m in ours.modules())


def test_repeated_pruning_keeps_one_mask_per_tensor():
    """Algorithm 5 prunes the same model many times; each tensor must keep one mask, not one per step."""
    model = tiny()
    for rate in (0.2, 0.4, 0.6):
        prune.global_unstructured(model, rate)
        prune.layer_unstructured(model, rate)
        prune.channel_structured(model, rate / 4)
    for _, m in models.prunable_layers(model):
        hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
        assert not any(isinstance(h, torch_prune.PruningContainer) for h in hooks)
        assert sorted(h._tensor_name for h in hooks) == sorted(n[:-5] for n, _ in m.named_buffers()
                                                               if n.endswith("_mask"))
        assert sorted(h._tensor_name for h in hooks) in (["weight"], ["bias", "weight"])
    x = torch.rand(4, 1, 8, 8)
    y = model(x)
    masks.make_permanent(model)
    assert not torch_prune.is_pruned(model) and torch.equal(model(x), y)


@pytest.mark.parametrize("grid", [0, 2000])
def test_global_masks_from_a_sampled_bracket_equal_the_full_partition(grid):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in ((1500, 1000), (300,), (7, 9, 5))]
    if grid:  # heavy ties at any threshold
        weights = [np.round(w * grid) / grid for w in weights]
    scores = np.concatenate([np.abs(w).ravel() for w in weights])
    for k in (1, 12345, scores.size // 2, scores.size - 1):
        got = np.concatenate([m.ravel() for m in prune._global_masks(weights, k)])
        assert np.array_equal(got.astype(bool), prune._keep_mask(scores, k)), k


def test_move_takes_the_masked_weights_along():
    """``Module.to`` leaves torch's masked ``weight`` attribute behind (a weight-sized tensor per
    layer on the old device); ``masks.move`` recomputes it where the parameters went."""
    model = tiny()
    prune.global_unstructured(model, 0.5)
    plain = masks.clone(model).to("meta")
    assert all(m.weight.device.type == "cpu" for _, m in models.prunable_layers(plain))
    masks.move(model, "meta")
    for _, m in models.prunable_layers(model):
        assert m.weight.device.type == m.weight_orig.device.type == m.weight_mask.device.type == "meta"


def test_global_pruning_without_masks_leaves_the_zeros_the_masks_would():
    """``masks=False`` (chapter 02's VGG16 size count) zeroes in place exactly the weights that
    masked pruning followed by ``make_permanent`` zeroes, and refuses a model already pruned."""
    masked, plain = tiny(), tiny()
    plain.load_state_dict(masked.state_dict())
    masks.make_permanent(prune.global_unstructured(masked, 0.6))
    assert prune.global_unstructured(plain, 0.6, masks=False) is plain and not torch_prune.is_pruned(plain)
    for (_, a), (_, b) in zip(models.prunable_layers(masked), models.prunable_layers(plain)):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="masks=False is not allowed on a pruned model"):
        prune.global_unstructured(prune.global_unstructured(tiny(), 0.3), 0.5, masks=False)
