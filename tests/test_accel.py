"""rclib.core.accel on a CPU: the plain runtime changes nothing, channels_last computes the same
function, bf16 autocast is really applied to forward passes and never to attack gradients (whose
FGSM examples must agree with fp32 on at least 99.9 % of the pixels, issue 13), and the settings
that only make sense on CUDA stay off here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from toys import tiny_vgg

from rclib.compress import harden
from rclib.core import accel, config
from rclib.data import datasets
from rclib.experiments import table1
from rclib.nn import masks, train
from rclib.nn.train import Optimiser
from rclib.robust import attacks, margin
from rclib.robust.margin import Objective

BF16 = accel.Runtime(precision="bf16")


def test_effective_precision():
    assert accel.effective_precision("auto", "cpu") == "fp32"
    assert accel.effective_precision("auto", "cuda") == "bf16"
    for p in accel.EFFECTIVE_PRECISIONS:
        assert accel.effective_precision(p, "cpu") == accel.effective_precision(p, "cuda") == p
    with pytest.raises(ValueError, match="precision='fp16'.*auto, fp32, bf16"):
        accel.effective_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision='auto'"):
        accel.Runtime(precision="auto")


def test_runtime_is_plain_on_cpu_and_fast_on_cuda():
    for profile in ("smoke", "cpu", "paper"):
        assert accel.runtime(config.profile_config(profile), "cpu") == accel.PLAIN
    cfg = config.load("smoke")
    assert accel.runtime(cfg) == accel.PLAIN  # no GPU on the test machines: auto is the CPU
    assert accel.runtime(cfg, "cuda") == accel.Runtime("bf16", channels_last=True, non_blocking=True)
    off = config.load("smoke", precision="fp32", channels_last=False, non_blocking=False)
    assert accel.runtime(off, "cuda") == accel.PLAIN
    assert accel.runtime(config.load("smoke", precision="bf16"), "cpu") == BF16


def test_compute_kind(monkeypatch):
    cfg = config.load("smoke")
    assert accel.compute_kind(cfg) == accel.compute_kind(cfg, "cpu") == "cpu/fp32"
    assert accel.compute_kind(config.load("smoke", precision="bf16")) == "cpu/bf16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert accel.compute_kind(cfg, "cuda") == "cuda:NVIDIA H200/bf16/channels_last"
    assert accel.compute_kind(config.load("smoke", precision="fp32", channels_last=False), "cuda") \
        == "cuda:NVIDIA H200/fp32"


def test_configure_sets_threads_on_cpu_and_cudnn_benchmark_on_cuda():
    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        torch.set_num_threads(2)
        accel.configure(config.load("smoke", threads=1, cudnn_benchmark=True), "cpu")
        assert torch.get_num_threads() == 1 and torch.backends.cudnn.benchmark == bench
        torch.set_num_threads(2)
        for flag in (True, False):
            accel.configure(config.load("smoke", threads=1, cudnn_benchmark=flag), "cuda")
            assert torch.backends.cudnn.benchmark is flag
            assert torch.get_num_threads() == 2  # threads is ignored on CUDA
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = bench


def _splits():
    return datasets.load(config.load("smoke", train_size=128, test_size=64, batch_size=32))


def test_plain_runtime_is_bit_identical_to_no_runtime():
    s = _splits()
    a, b = tiny_vgg(0), tiny_vgg(0)
    ha = train.fit(a, s.train, 2, optimiser=Optimiser(lr=3e-3), progress=False)
    hb = train.fit(b, s.train, 2, optimiser=Optimiser(lr=3e-3), progress=False, runtime=accel.runtime(config.load("smoke")))
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert train.evaluate(a, s.test) == train.evaluate(a, s.test, runtime=accel.PLAIN)
    assert torch.equal(attacks.robust_correct(a, s.test, attacks.fgsm, 0.1),
                       attacks.robust_correct(a, s.test, attacks.fgsm, 0.1, runtime=accel.PLAIN))


def test_channels_last_model_computes_the_same_function():
    model = tiny_vgg(0, input_shape=[3, 16, 16]).eval()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
    names = list(model.state_dict())
    rt = accel.Runtime(channels_last=True)
    accel.prepare(model, rt)
    conv = model.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(model.state_dict()) == names
    xc = accel.to_device(x, torch.device("cpu"), rt)
    assert xc.is_contiguous(memory_format=torch.channels_last) and torch.equal(xc, x)
    with torch.no_grad():
        assert torch.allclose(model(xc), plain, atol=1e-5, rtol=1e-4)
    assert accel.prepare(model, accel.PLAIN) is model


def test_bf16_autocast_reaches_forward_passes_of_training_and_evaluation():
    s = _splits()
    model = tiny_vgg(0)
    seen: list[torch.dtype] = []
    hook = model.classifier.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    history = train.fit(model, s.train, 2, optimiser=Optimiser(lr=3e-3), progress=False, runtime=BF16)
    assert set(seen) == {torch.bfloat16} and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 weights
    seen.clear()
    acc16 = train.evaluate(model, s.test, runtime=BF16)
    assert set(seen) == {torch.bfloat16}
    assert abs(acc16 - train.evaluate(model, s.test)) <= 0.1
    seen.clear()
    assert train.predict(model, datasets.as_tensors(s.test.dataset)[0], runtime=BF16).dtype == torch.float32
    hook.remove()


def test_alg7_runs_under_bf16():
    s = _splits()
    model = tiny_vgg(0)
    history = margin.adversarial_retrain(model, s.train, objective=Objective(eps=0.1, margin_weight=0.1), progress=False, runtime=BF16)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))


def _autocast_gradient(model, x, y):
    """What input_gradient would return if autocast reached it (it does not)."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, x)[0]


def test_fgsm_under_bf16_agrees_with_fp32_on_at_least_999_of_1000_pixels(trained_toy):
    model, s = trained_toy
    model.eval()
    x, y = datasets.as_tensors(s.test.dataset)
    for eps in (0.03, 0.1):
        fp32 = attacks.fgsm(model, x, y, eps)
        with accel.autocast(torch.device("cpu"), BF16):
            bf16 = attacks.fgsm(model, x, y, eps)
        share = (fp32 == bf16).float().mean().item()
        print(f"FGSM eps {eps}: bf16 loop agrees with fp32 on {share:.6f} of the pixels")
        assert share >= 0.999
    # the guard is needed: with autocast reaching the gradient, signs differ on a few % of pixels
    raw = (_autocast_gradient(model, x, y).sign() == attacks.input_gradient(model, x, y).sign()).float().mean()
    print(f"raw bf16 autocast gradient signs agree on {raw.item():.6f} of the pixels")
    assert raw < 0.999


def test_pgd_and_robust_correct_under_bf16(trained_toy):
    model, s = trained_toy
    x, y = datasets.as_tensors(s.test.dataset)
    with accel.autocast(torch.device("cpu"), BF16):
        bf16 = attacks.pgd(model, x, y, 0.1, steps=3, random_start=False)
    assert torch.equal(bf16, attacks.pgd(model, x, y, 0.1, steps=3, random_start=False))
    plain = attacks.robust_correct(model, s.test, attacks.fgsm, 0.1)
    fast = attacks.robust_correct(model, s.test, attacks.fgsm, 0.1, runtime=BF16)
    assert fast.dtype == torch.bool and fast.shape == plain.shape
    assert (fast == plain).float().mean() >= 0.9  # only the final classification is bf16


def test_batch_to_moves_both_tensors_and_keeps_blocking_copies_without_pinned_memory():
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4)
    assert not loader.pin_memory
    xd, yd = accel.batch_to(x, y, torch.device("cpu"), accel.Runtime(non_blocking=True), loader)
    assert torch.equal(xd, x) and torch.equal(yd, y)


def test_channels_last_model_is_pruned_shared_hardened_and_saved_like_nchw(tmp_path):
    from rclib.compress import codec, prune, share

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = tiny_vgg(0, input_shape=[3, 16, 16])
    fast = accel.prepare(tiny_vgg(0, input_shape=[3, 16, 16]), accel.Runtime(channels_last=True))
    for m in (plain, fast):
        prune.global_unstructured(m, 0.5)
        share.weight_share(m, {"conv": 4, "linear": 3})  # writes through flat positions
    assert fast.features[0].weight_orig.is_contiguous(memory_format=torch.channels_last)
    a, b = masks.effective_state(plain), masks.effective_state(fast)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codec.save_compressed(plain, tmp_path / "a")
    codec.save_compressed(fast, tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    with torch.no_grad():
        assert torch.allclose(harden.harden(fast).eval()(x), harden.harden(plain).eval()(x), atol=1e-5)


def test_pipeline_steps_run_under_bf16_and_cache_apart_from_fp32():
    from rclib.core import artifacts
    from rclib.experiments import steps, variants

    cfg = config.load("smoke", epsilon=0.1, train_size=128, test_size=32, epochs=1, width=4, hidden=16, precision="bf16",
                      prune_rates=(0.5,), adv_epochs=1)
    splits = datasets.load(cfg)
    base, metrics, hit = steps.baseline(cfg, splits, progress=False)
    assert not hit and 0 <= metrics["clean_accuracy"] <= 1
    rows, states, _ = table1.robust_table(cfg, splits, base, 0.5, progress=False)
    assert {r["variant"] for r in rows} >= set(variants.labels(variants.TABLE1)) and set(states) >= set(variants.TABLE1)
    plain = dataclasses.replace(cfg, precision="fp32")
    assert artifacts.location(plain, steps.BASELINE) != \
        artifacts.location(cfg, steps.BASELINE)
    assert steps.runtime_of(cfg, base) == BF16 and steps.runtime_of(plain, base) == accel.PLAIN


def test_pipeline_keys_follow_the_model_device_not_only_the_config(monkeypatch):
    from rclib.experiments import steps

    cfg = config.load("smoke")
    model = tiny_vgg(0)
    assert steps.kind_of(cfg, model) == "cpu/fp32"
    monkeypatch.setattr(train, "model_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert steps.kind_of(cfg, model) == "cuda:NVIDIA H200/bf16/channels_last"
