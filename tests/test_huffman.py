"""Huffman streams: the same bytes as the frozen first writer, both decoders exact, corruption refused."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from rclib.compress import huffdecode, huffman

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def frozen():
    """rclib's storage module at e46de29 (before issue 15), whose stream encoder wrote format 1."""
    sys.path.insert(0, str(BENCH))  # the frozen copies import each other as frozen.*
    try:
        spec = importlib.util.spec_from_file_location("storage_e46de29", BENCH / "frozen" / "storage_e46de29.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _geometric(n, p, alphabet, seed=0):
    sym = np.minimum(np.random.default_rng(seed).geometric(p, n) - 1, alphabet - 1)
    return sym.astype(np.uint8 if alphabet <= 256 else np.uint16)


def _fibonacci(alphabet, seed=0):
    """Counts 1, 1, 2, 3, 5, ...: the Huffman code is ``alphabet - 1`` bits deep, unless limited."""
    fib = [1, 1]
    while len(fib) < alphabet:
        fib.append(fib[-1] + fib[-2])
    sym = np.repeat(np.arange(alphabet, dtype=np.uint8), fib)
    return np.random.default_rng(seed).permutation(sym)


STREAMS = {
    "gaps 50%, 3 chunks + odd": (_geometric(3 * 2**18 + 7, 0.5, 256), 256),
    "gaps 90%, 1-bit codes": (_geometric(600_001, 0.9, 256), 256),
    "codes 5-bit": (_geometric(300_000, 0.1, 32), 32),
    "codes 8-bit, ~7 bits": (_geometric(200_003, 0.02, 256), 256),
    "uniform 256: all codes 8 bits": (np.random.default_rng(1).integers(0, 256, 100_000).astype(np.uint8), 256),
    "20-bit codes": (_fibonacci(21), 21),
    "limited to 20 bits (from 26)": (_fibonacci(27), 27),
    "two symbols": (np.random.default_rng(2).integers(0, 2, 70_001).astype(np.uint8), 2),
    "tiny": (np.array([0, 1, 1, 2, 0], np.uint8), 3),
    "uint16 alphabet": (_geometric(100_000, 0.01, 5000), 5000),
    "last block one symbol": (_geometric(32 * 40 + 1, 0.3, 256), 256),
}


def _parts(meta, data):
    bits = np.frombuffer(huffman.segment(data, meta["bits"]), np.uint8)
    lengths = np.frombuffer(huffman.segment(data, meta["lengths"]), np.uint8)
    nb = -(-meta["n"] // meta["block"])
    bm = meta["blocks"]
    blen = huffman.read_fixed(huffman.segment(data, bm["data"]), nb - 1, bm["width"]) + bm["min"]
    return bits, lengths, np.concatenate([[0], np.cumsum(blen)])


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_bytes_equal_the_frozen_writer_and_both_decoders_are_exact(frozen, name):
    sym, alphabet = STREAMS[name]
    out, old = huffman.Payload(), frozen._Payload()
    meta = huffman.encode_stream(sym, alphabet, out)
    assert meta == frozen._encode_stream(sym, alphabet, old)
    data = b"".join(out.parts)
    assert data == b"".join(old.parts)
    assert np.array_equal(huffdecode.decode_stream(meta, memoryview(data)), sym)
    bits, lengths, starts = _parts(meta, memoryview(data))
    n, block = meta["n"], meta["block"]
    assert np.array_equal(huffdecode.by_symbol(bits, lengths, starts, n, block, sym.dtype), sym)
    if alphabet <= 256:
        assert np.array_equal(huffdecode.by_byte(bits, meta["nbits"], huffdecode.machine(lengths), starts, n, block), sym)


@pytest.mark.parametrize("name, size", [
    ("gaps 90%, 1-bit codes", 8),  # a byte can complete 8 symbols
    ("codes 5-bit", 4),  # codes of 3 bits or more: at most 3 per byte
    ("uniform 256: all codes 8 bits", 1),  # at most one symbol per byte
])
def test_machine_record_widths(name, size):
    sym, alphabet = STREAMS[name]
    lengths = huffman._huffman_lengths(huffman.counts_of(sym, alphabet))
    m = huffdecode.machine(lengths)
    assert m.records.itemsize == size and int(m.counts.max()) <= size
    assert m.records.size == m.counts.size == m.base.size == m.inner.shape[0] * 256


def test_counts_of_bytes_and_wider_symbols():
    for sym, alphabet in (STREAMS["codes 5-bit"], STREAMS["uint16 alphabet"]):
        assert np.array_equal(huffman.counts_of(sym, alphabet), np.bincount(sym, minlength=alphabet))


@pytest.mark.parametrize("decoder", ["byte", "symbol"])
@pytest.mark.parametrize("edit", ["shift first block end", "drop a bit"])
def test_inconsistent_streams_are_corrupt(decoder, edit):
    sym, alphabet = STREAMS["gaps 50%, 3 chunks + odd"]
    sym = sym[:50_000]
    out = huffman.Payload()
    meta = huffman.encode_stream(sym, alphabet, out)
    bits, lengths, starts = _parts(meta, memoryview(b"".join(out.parts)))
    nbits = meta["nbits"]
    if edit == "shift first block end":
        starts = starts.copy()
        starts[1] += 1
    elif edit == "drop a bit":  # every bit after the first moves up by one
        b = np.unpackbits(bits)
        bits = np.packbits(np.concatenate([b[:1], b[2:], [0]]))
        nbits -= 1
    with pytest.raises(huffman.Corrupt):
        if decoder == "byte":
            huffdecode.by_byte(bits, nbits, huffdecode.machine(lengths), starts, meta["n"], meta["block"])
        else:
            huffdecode.by_symbol(bits, lengths, starts, meta["n"], meta["block"], np.uint8)


def test_lying_block_offsets_cannot_make_the_byte_decoder_allocate_much():
    sym, alphabet = STREAMS["gaps 50%, 3 chunks + odd"]
    out = huffman.Payload()
    meta = huffman.encode_stream(sym[:50_000], alphabet, out)
    bits, lengths, starts = _parts(meta, memoryview(b"".join(out.parts)))
    squeezed = np.arange(starts.size)  # every block one bit long but the last: it would span all
    with pytest.raises(huffman.Corrupt, match="block offsets"):
        huffdecode.by_byte(bits, meta["nbits"], huffdecode.machine(lengths), squeezed, meta["n"], meta["block"])
