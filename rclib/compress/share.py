"""Weight sharing (paper Sec. 1.2 and 2.2: Alg 6, Eq 6-7).

Weight sharing is the quantiser ``Q`` of the paper's Eq 2: every prunable layer's non-zero
weights are clustered by k-means into ``2^n`` values (``l_bins``) whose initial centroids are
*linearly spaced* between the layer's smallest and largest weight; each weight is then replaced
by its centroid. A layer can then be stored as ``n``-bit indices into a ``2^n``-entry float
lookup table plus the positions of the non-zeros (COO), instead of 32-bit floats.

The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import torch
from torch import nn

from rclib.compress.kmeans import kmeans_1d
from rclib.nn.masks import effective
from rclib.nn.models import prunable_layers

Bits = Union[int, Mapping[str, int]]
DEFAULT_BITS: dict[str, int] = {"conv": 8, "linear": 5}  # the paper's Sec. 3.2 (2^8 and 2^5 bins)


@dataclass
class Codebook:
    """One weight-shared layer in COO form (Alg 6's ``(C, Quantized_W)``).

    Attributes:
        centroids: (k,) float32, sorted ascending, ``k <= 2^bits`` (fewer only when the layer has
            fewer distinct non-zero weights than ``2^bits``).
        indices: (nnz,) codes into ``centroids`` of the non-zero weights, in row-major order
            (uint8 when k <= 256, else uint16).
        positions: (nnz,) int64 flat row-major indices of the non-zero weights.
        shape: the weight tensor's shape.
        bits: the index width n of the layer.
    """

    centroids: np.ndarray
    indices: np.ndarray
    positions: np.ndarray
    shape: tuple[int, ...]
    bits: int

    def dense(self) -> np.ndarray:
        """The quantised weight tensor (float32, zeros where pruned)."""
        w = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        w[self.positions] = self.centroids[self.indices]
        return w.reshape(self.shape)


def validate_bits(bits: Bits, names: list[str] | None = None) -> None:
    def one(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 16:
            raise ValueError(f"bits{where}={v!r} is not allowed: an index width from 1 to 16 "
                             "(2 to 65536 shared values per layer)")

    if isinstance(bits, Mapping):
        allowed = {"conv", "linear"} | set(names or [])
        for key, v in bits.items():
            if key not in allowed:
                raise ValueError(f"bits has key {key!r}: allowed keys are 'conv', 'linear' or a "
                                 "prunable layer name")
            one(v, f"[{key!r}]")
    else:
        one(bits, "")


def layer_bits(bits: Bits, name: str, module: nn.Module) -> int:
    if not isinstance(bits, Mapping):
        return int(bits)
    if name in bits:
        return int(bits[name])
    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    if kind not in bits:
        raise ValueError(f"bits={dict(bits)!r} gives no width for {kind} layer {name!r}")
    return int(bits[kind])


def set_weight_values(module: nn.Module, positions: np.ndarray, values: np.ndarray,
                      name: str = "weight") -> None:
    """Write ``values`` at flat ``positions`` of the layer's weight, keeping any pruning mask.

    With torch pruning the values go into ``weight_orig`` (so ``weight = orig * mask`` keeps the
    pruned zeros) and the cached ``weight`` attribute is recomputed, without autograd history (a
    tensor with history cannot be deep-copied, see DESIGN.md).
    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
    """
    masked = hasattr(module, f"{name}_orig")
    target = getattr(module, f"{name}_orig" if masked else name)
    with torch.no_grad():
        idx = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(target.device)
        val = torch.from_numpy(np.ascontiguousarray(values)).to(target.device, target.dtype)
        if target.is_contiguous():
            target.view(-1)[idx] = val
        else:  # channels_last (accel.prepare on CUDA): positions are in logical order, write through a copy
            flat = target.flatten()
            flat[idx] = val
            target.copy_(flat.view(target.shape))
        if masked:
            setattr(module, name, target * getattr(module, f"{name}_mask"))


def share_tensor(weight: np.ndarray, bits: int, iters: int = 300, refine: int = 1000) -> Codebook:
    """Alg 6 on one weight array, without touching any model.

    Args:
        weight: the layer's (effective) weight, any shape, float32; zeros are pruned weights.
        bits: index width n (1..16): k-means of the non-zeros into ``2^n`` centroids initialised
            linearly between their min and max.
        iters, refine: as in :func:`kmeans_1d`.

    Returns:
        The :class:`Codebook` (COO); ``Codebook.dense()`` is the weight-shared tensor.

    Example:
        >>> book = share_tensor(layer.weight.detach().numpy(), 5)
        >>> np.unique(book.dense()).size <= 2**5 + 1  # the centroids and 0
        True

    Used by chapter 02 (weight sharing) and 04, and by ``codec.save_compressed(bits=...)``.
    """
    validate_bits(bits)
    w = np.asarray(weight, dtype=np.float32)
    flat = w.reshape(-1)
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return Codebook(np.zeros(0, np.float32), np.zeros(0, np.uint8), pos, tuple(w.shape), bits)
    cent, lab = kmeans_1d(flat[pos], 2**bits, iters=iters, refine=refine)
    return Codebook(cent, lab, pos, tuple(w.shape), bits)


def weight_share(model: nn.Module, bits: Bits = DEFAULT_BITS, layers: list[str] | None = None,
                 iters: int = 300, refine: int = 1000) -> dict[str, Codebook]:
    """Alg 6 (weight sharing Q), in place on every prunable layer of ``model``.

    Per layer: take the non-zero weights (COO), run k-means with ``2^n`` centroids initialised
    linearly between the layer's smallest and largest non-zero weight, and replace each non-zero
    weight by its centroid. Pruned zeros stay exactly zero (with torch pruning masks the shared
    values go into ``weight_orig``; the mask is kept). Biases are not shared (the paper shares
    weights only).

    Args:
        model: any module; its layers are ``models.prunable_layers(model)`` (L_prune(h)).
        bits: index width n per layer: an int for all layers, or a dict with keys ``"conv"``,
            ``"linear"`` and/or layer names (a name wins over its kind). Default
            ``{"conv": 8, "linear": 5}`` (Sec. 3.2). Each width must be 1..16 (``ValueError``
            naming ``bits`` otherwise); the paper requires n < weight_data_size (32).
        layers: names of the prunable layers to share; default all.
        iters, refine: maximum Lloyd iterations per run and split-merge moves per layer
            (see :func:`kmeans_1d`); ``refine=0`` is plain Lloyd with empty clusters re-seeded.

    Returns:
        ``{layer_name: Codebook}`` with centroids (k,) float32 and codes/positions (nnz,).

    Example:
        >>> books = weight_share(model, bits={"conv": 8, "linear": 5})
        >>> len(np.unique(books["classifier.0"].centroids)) <= 2**5
        True

    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
    """
    named = prunable_layers(model)
    names = [n for n, _ in named]
    validate_bits(bits, names)
    if layers is not None:
        unknown = sorted(set(layers) - set(names))
        if unknown:
            raise ValueError(f"layers={unknown!r} are not prunable layers; known: {names}")
    books: dict[str, Codebook] = {}
    for name, module in named:
        if layers is not None and name not in layers:
            continue
        b = layer_bits(bits, name, module)
        w = effective(module).cpu().numpy()
        book = share_tensor(w, b, iters=iters, refine=refine)
        if book.positions.size:
            set_weight_values(module, book.positions, book.centroids[book.indices])
        books[name] = book
    return books


def codebooks(model: nn.Module) -> dict[str, np.ndarray]:
    """The distinct non-zero weight values of each prunable layer (sorted float32).

    After :func:`weight_share` these are the layer's used centroids, so ``len`` is at most
    ``2^n`` (the guarantee of Eq 7 checked in the paper's Fig. 6).
    The clustering itself is :func:`rclib.compress.kmeans.kmeans_1d`.

Used by chapter 02 (weight sharing) and 04.
    """
    out = {}
    for name, module in prunable_layers(model):
        w = effective(module).cpu().numpy().reshape(-1)
        out[name] = np.unique(w[w != 0]).astype(np.float32)
    return out


