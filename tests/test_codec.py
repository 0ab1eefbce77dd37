"""The compressed model file: exact round trip, architecture rebuild, corruption refused, size."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from rclib.compress import codebook, codec, container, huffdecode, huffman, share, sizes
from rclib.nn import masks, models

SPEC = dict(model="vgg_small", width=8, hidden=32, batch_norm=True, dropout=0.5, num_classes=10,
            input_shape=[1, 8, 8], mean=[0.3], std=[0.3])


def _model(rate: float = 0.5, shared: bool = True, width: int = SPEC["width"]) -> nn.Module:
    torch.manual_seed(0)
    model = models.from_spec({**SPEC, "width": width})
    for m in model.modules():  # non-trivial BatchNorm statistics, so buffers matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    params = [(m, "weight") for _, m in models.prunable_layers(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=rate)
    if shared:
        share.weight_share(model, {"conv": 8, "linear": 5})
    return model.eval()


def _x():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = tmp_path / "m.rclz"
    n = codec.save_compressed(model, path)
    assert n == path.stat().st_size
    return model, path


def test_round_trip_rebuilds_architecture_and_logits_are_equal(saved):
    model, path = saved
    loaded = codec.load_compressed(path)  # no model=: rebuilt from the recorded spec
    assert isinstance(loaded, models.VGG) and not loaded.training
    assert models.describe(loaded) == models.describe(model)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    for name, t in masks.effective_state(model).items():
        assert torch.equal(masks.effective_state(loaded)[name], t), name


def test_fill_given_models_plain_and_pruned(saved):
    model, path = saved
    plain = codec.load_compressed(path, model=models.from_spec(SPEC)).eval()
    masked = _model(rate=0.2, shared=False)  # another mask: the file's pattern replaces it
    codec.load_compressed(path, model=masked)
    with torch.no_grad():
        assert torch.equal(plain(_x()), model(_x()))
        assert torch.equal(masked(_x()), model(_x()))


def test_file_much_smaller_than_dense(tmp_path):
    # at the cpu profile's width: at width 8 every layer is so small (blocks 4-5 have 1x1 kernels)
    # that the per-layer codebooks and headers are a large share of the file (2.9x, not 4x)
    model = _model(width=16)
    path = tmp_path / "m.rclz"
    codec.save_compressed(model, path)
    dense = sizes.dense_bytes(model)
    assert path.stat().st_size < dense / 4
    rep = sizes.size_report(model)
    assert rep["file_bytes"] == path.stat().st_size and rep["dense_bytes"] == dense
    assert rep["entropy_bound_bytes"] <= rep["file_bytes"]
    assert rep["shared_approx_bytes"] < rep["approx_bytes"] < dense


def test_pruned_not_shared_round_trip_exact(tmp_path):
    model = _model(shared=False)  # ~all distinct values: stored sparse with raw float32 values
    path = tmp_path / "p.rclz"
    codec.save_compressed(model, path)
    with torch.no_grad():
        assert torch.equal(codec.load_compressed(path)(_x()), model(_x()))


def test_bits_on_save_shares_while_writing_and_leaves_model(tmp_path):
    model = _model(shared=False)
    before = {k: v.clone() for k, v in masks.effective_state(model).items()}
    codec.save_compressed(model, tmp_path / "s.rclz", bits={"conv": 8, "linear": 5})
    for k, v in masks.effective_state(model).items():
        assert torch.equal(v, before[k])
    share.weight_share(model, {"conv": 8, "linear": 5})
    with torch.no_grad():
        assert torch.equal(codec.load_compressed(tmp_path / "s.rclz")(_x()), model(_x()))


def test_truncated_file_refused(saved):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 30, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt|not an rclib"):
            codec.load_compressed(path)


@pytest.mark.parametrize("where", [0.01, 0.3, 0.6, 0.999])
def test_flipped_byte_refused(saved, where):
    _, path = saved
    data = bytearray(path.read_bytes())
    i = max(60, int(len(data) * where))  # after the fixed prefix: header or payload
    data[i] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        codec.load_compressed(path)


def test_bad_magic_and_version_refused(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.rclz"
    bad.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(ValueError, match="magic"):
        codec.load_compressed(bad)
    data[8] = 99
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version"):
        codec.load_compressed(bad)


def test_atomic_write_leaves_no_temp_and_replaces(saved):
    model, path = saved
    codec.save_compressed(model, path)
    assert os.listdir(path.parent) == [path.name]


def test_non_vgg_needs_model_and_mismatch_refused(tmp_path):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    share.weight_share(seq, bits=2)
    path = tmp_path / "seq.rclz"
    codec.save_compressed(seq, path)
    with pytest.raises(ValueError, match="model="):
        codec.load_compressed(path)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(3, 6)
    assert torch.equal(codec.load_compressed(path, model=other)(x), seq(x))
    with pytest.raises(ValueError, match="does not match"):
        codec.load_compressed(path, model=nn.Sequential(nn.Linear(6, 4)))


def test_huffman_streams_round_trip_and_near_entropy():
    rng = np.random.default_rng(0)
    for n, alphabet in [(1, 4), (7, 256), (50_000, 32), (20_000, 5000)]:
        sym = np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1).astype(np.uint8 if alphabet <= 256 else np.uint16)
        out = huffman.Payload()
        meta = huffman.encode_stream(sym, alphabet, out)
        data = memoryview(b"".join(out.parts))
        assert np.array_equal(huffdecode.decode_stream(meta, data), sym)
    # Huffman costs at most 1 bit per symbol over the entropy (plus tables and block offsets)
    bound = huffman.entropy_bits(np.bincount(sym[:50_000], minlength=alphabet)) / 8
    assert out.size <= bound + sym.size / 8 + 5000 + 1024


def _resign(path, edit, raw=None, flags=0):
    """Rewrite the header with ``edit`` (then ``raw`` on its bytes) and a valid checksum: a file
    that lies consistently."""
    import hashlib
    import json
    import struct

    data = path.read_bytes()
    hlen = struct.unpack_from("<Q", data, 12)[0]
    header, payload = json.loads(data[60:60 + hlen]), data[60 + hlen:]
    edit(header)
    hb = json.dumps(header).encode()
    if raw is not None:
        hb = raw(hb)
    prefix = struct.pack("<8sHHQQ", container.MAGIC, container.FORMAT_VERSION, flags, len(hb), len(payload))
    path.write_bytes(prefix + hashlib.sha256(prefix + hb + payload).digest() + hb + payload)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["tensors"][0]["shape"].__setitem__(0, 10**12), "in the file but"),
    (lambda h: next(t for t in h["tensors"] if t["encoding"] == "shared").__setitem__("nnz", 10**12), "corrupt"),
    (lambda h: next(t for t in h["tensors"] if "block" in t.get("codes", {}))["codes"].__setitem__("block", 10**9), "corrupt"),
    (lambda h: next(t for t in h["tensors"] if t["encoding"] == "raw").__setitem__("data", [0, 10**9]), "corrupt"),
    (lambda h: h.__setitem__("tensors", "none"), "corrupt"),
])
def test_lying_header_with_valid_checksum_refused(saved, edit, match):
    _, path = saved
    _resign(path, edit)
    with pytest.raises(ValueError, match=match):
        codec.load_compressed(path)


def _reference_models():
    """Seeded models whose weights need no k-means (a 1/16 or 1/40 grid, one layer left raw) and
    random masks, so the expected files below do not depend on weight sharing's algorithm."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vgg = models.from_spec(SPEC)
    with torch.no_grad():
        for m in vgg.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        for i, (_, m) in enumerate(models.prunable_layers(vgg)):
            w = torch.randn(m.weight.shape, generator=g)
            m.weight.copy_(w if i == 2 else torch.round(w * 16) / 16)  # layer 2: "sparse", raw values
    for _, m in models.prunable_layers(vgg):
        prune.custom_from_mask(m, "weight", torch.rand(m.weight.shape, generator=g) > 0.6)
    g = torch.Generator().manual_seed(1)
    seq = nn.Sequential(nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 10))  # 247k non-zeros
    with torch.no_grad():
        for m in (seq[0], seq[2]):
            m.weight.copy_(torch.round(torch.randn(m.weight.shape, generator=g) * 40) / 40)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    prune.custom_from_mask(seq[0], "weight", torch.rand(seq[0].weight.shape, generator=g) > 0.5)
    return {"vgg": vgg.eval(), "seq": seq}


# sha256 and length of the file rclib wrote before the codec was rewritten for speed (e46de29);
# the toy VGG's architecture has changed since (1x1 kernels on 1x1 maps), so its reference is the
# frozen e46de29 writer itself, run on today's model
EXPECTED = {"seq": (304806, "50f07d6da312d31aaa36c09c5114c6dd1a1d6e8402c2804e203aaee0c3e2011e")}


def _frozen_writer(monkeypatch):
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))  # the frozen copies import each other as frozen.*
    path = bench / "frozen" / "storage_e46de29.py"
    spec = importlib.util.spec_from_file_location("storage_e46de29", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["seq", "vgg"])
def test_files_are_byte_identical_to_the_format_version_1_writer(tmp_path, monkeypatch, name):
    import hashlib

    model = _reference_models()[name]
    path = tmp_path / f"{name}.rclz"
    n = codec.save_compressed(model, path)
    if name in EXPECTED:
        assert n == EXPECTED[name][0]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED[name][1]
    else:
        old = tmp_path / f"{name}.old.rclz"
        assert _frozen_writer(monkeypatch).save_compressed(_reference_models()[name], old) == n
        assert old.read_bytes() == path.read_bytes()
    back = codec.load_compressed(path, model=_reference_models()[name])
    for k, v in masks.effective_state(model).items():
        assert torch.equal(masks.effective_state(back)[k], v), k


def test_spec_bigger_than_its_records_refused_without_allocating(saved, monkeypatch):
    _, path = saved

    def one_huge_linear(h):  # a 30000x30000 layer in the spec, the tensor records unchanged
        h["spec"]["layers"]["classifier"].insert(0, ["linear", 30000, 30000])

    _resign(path, one_huge_linear)
    monkeypatch.setattr(nn.Module, "to_empty", lambda *a, **k: pytest.fail("materialised the spec"))
    # the spec no longer chains (64 features into a 30000-input layer): refused by the spec check
    with pytest.raises(ValueError, match=r"spec\.layers\.classifier\[0\].*is not allowed"):
        codec.load_compressed(path)


def _set(field, value):
    def edit(h):
        h["spec"][field] = value
    return edit


def _last_relu(h):  # a ReLU after the logits: loads, then clamps every negative logit to 0
    h["spec"]["layers"]["classifier"].append(["relu"])


def _pool(h):  # a pooling size the first linear layer does not take (a 10 TB forward pass)
    h["spec"]["layers"]["avgpool"] = ["avgpool", [100000, 100000]]


def _conv_channels(h):  # a convolution that takes other channels than the previous layer gives
    conv = next(e for e in h["spec"]["layers"]["features"] if e[0] == "conv")
    conv[1] += 1


def _twice(h):  # one tensor record listed twice
    h["tensors"].append(dict(h["tensors"][0]))


@pytest.mark.parametrize("edit, field", [
    (_set("std", [0.0]), r"spec\.std\[0\]=0\.0"),
    (_set("std", [-1.0]), r"spec\.std\[0\]"),
    (_set("mean", [0.1, 0.2]), r"spec\.mean="),
    (_set("mean", ["a"]), r"spec\.mean\[0\]"),
    (_set("input_shape", [1, 8]), r"spec\.input_shape"),
    (_set("num_classes", 0), r"spec\.num_classes"),
    (_last_relu, r"spec\.layers\.classifier\[\d+\].*last layer must be a linear"),
    (_pool, r"spec\.layers\.avgpool height"),
    (_conv_channels, r"spec\.layers\.features\[\d+\]"),
    (_twice, r"listed twice: \['"),
])
def test_spec_fields_without_tensors_are_checked(saved, edit, field):
    """Fields that carry no tensors (valid checksums): each bad one is refused naming the path and the field."""
    _, path = saved
    _resign(path, edit)
    with pytest.raises(ValueError, match=field) as err:
        codec.load_compressed(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_spec_and_records_too_big_for_the_payload_refused_without_allocating(saved, monkeypatch):
    _, path = saved

    def wide(h):  # spec and records agree on a 30000-unit hidden layer; the payload is ~100 kB
        cls = h["spec"]["layers"]["classifier"]
        lin = [e for e in cls if e[0] == "linear"]
        lin[0][2] = lin[1][1] = lin[1][2] = lin[2][1] = 30000
        shapes = {"classifier.0.weight": [30000, lin[0][1]], "classifier.0.bias": [30000],
                  "classifier.3.weight": [30000, 30000], "classifier.3.bias": [30000],
                  "classifier.6.weight": [lin[2][2], 30000]}
        for t in h["tensors"]:
            t["shape"] = shapes.get(t["name"], t["shape"])

    _resign(path, wide)
    monkeypatch.setattr(nn.Module, "to_empty", lambda *a, **k: pytest.fail("materialised the spec"))
    with pytest.raises(ValueError, match="architecture holds 3,6.* bytes of tensors, more than"):
        codec.load_compressed(path)


def test_non_regular_files_refused(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        codec.load_compressed("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        codec.load_compressed(tmp_path)


def test_prefix_lengths_checked_against_the_file_size_before_reading(saved):
    import struct

    _, path = saved
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 20, 2**60)  # a payload of an exabyte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        codec.load_compressed(path)


def test_deeply_nested_header_refused(saved):
    _, path = saved
    _resign(path, lambda h: h.__setitem__("spec", None), raw=lambda hb: hb[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ValueError, match="nested too deeply"):
        codec.load_compressed(path)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.__setitem__("format", "zip"), "header format 'zip'"),
    (lambda h: h.__setitem__("version", 2), "version 2"),
    (lambda h: h.pop("version"), "version None"),
])
def test_header_format_and_version_checked(saved, edit, match):
    _, path = saved
    _resign(path, edit)
    with pytest.raises(ValueError, match=match):
        codec.load_compressed(path)


def test_flags_checked(saved):
    _, path = saved
    _resign(path, lambda h: None, flags=1)
    with pytest.raises(ValueError, match="flags 0x0001"):
        codec.load_compressed(path)


def _edge_model():
    """Layers that take the codec's rarer paths: all zeros, one distinct value, a few non-zeros
    far apart (capped gap alphabet, overflow gaps), a layer over 2^18 non-zeros whose rarest
    values appear only at its end (the hash coder meets values its sample lacked) and one with
    more than 256 distinct values (16-bit codes)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)  # the biases
    seq = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(4096, 64),
                        nn.Linear(1000, 600), nn.Linear(700, 500))
    with torch.no_grad():
        seq[0].weight.zero_()
        seq[1].weight.fill_(0.5)
        seq[1].weight[::3] = 0
        w = torch.zeros(64 * 4096)
        w[torch.randperm(w.numel(), generator=g)[:7]] = torch.randn(7, generator=g)
        seq[2].weight.copy_(w.reshape(64, 4096))
        book = torch.linspace(-1, 1, 256)
        idx = torch.randint(0, 250, (600, 1000), generator=g)
        idx.view(-1)[-6:] = torch.tensor([250, 251, 252, 253, 254, 255])
        keep = torch.rand(600, 1000, generator=g) > 0.3
        keep.view(-1)[-6:] = True
        seq[3].weight.copy_(book[idx] * keep)
        seq[4].weight.copy_(torch.linspace(-1, 1, 300)[torch.randint(0, 300, (500, 700), generator=g)])
    return seq


def test_edge_layers_round_trip_exactly_and_equal_the_format_version_1_writer(tmp_path, monkeypatch):
    model = _edge_model()
    entries = {e["name"]: e for e in codec.plan(model)}
    assert entries["0.weight"]["nnz"] == 0
    assert entries["1.weight"]["encoding"] == "shared" and entries["1.weight"]["codebook"].size == 1
    assert entries["2.weight"]["overflow"].size > 0
    assert entries["3.weight"]["codebook"].size == 256 and entries["3.weight"]["codes"].dtype == np.uint8
    assert entries["4.weight"]["codebook"].size == 300 and entries["4.weight"]["codes"].dtype == np.uint16
    path, old = tmp_path / "edge.rclz", tmp_path / "edge.old.rclz"
    n = codec.save_compressed(model, path)
    assert _frozen_writer(monkeypatch).save_compressed(_edge_model(), old) == n
    assert old.read_bytes() == path.read_bytes()
    back = codec.load_compressed(path, model=_edge_model())
    for k, v in masks.effective_state(model).items():
        assert torch.equal(masks.effective_state(back)[k], v), k


@pytest.mark.parametrize("seeded, total", [(250, 260), (200, 256), (300, 310)])
def test_hash_coder_meets_values_its_sample_lacked(seeded, total):
    rng = np.random.default_rng(0)
    book = np.sort(rng.standard_normal(total).astype(np.float32))
    codes = rng.integers(0, seeded, 400_000)
    codes[-(total - seeded):] = np.arange(seeded, total)  # the rest only at the end
    values = book[codes]
    uniq, got = codebook.distinct(values)
    assert np.array_equal(uniq, book) and np.array_equal(got, codes)
    assert got.dtype == (np.uint8 if total <= 256 else np.uint16)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_stored_raw(bad):
    values = np.repeat(np.float32([0.25, -1.5, 3.0]), 100_000)
    values[250_000] = bad  # after the sample the hash coder starts from
    assert codebook.distinct(values) is None
    assert codebook.distinct(values[:1000]) is not None
