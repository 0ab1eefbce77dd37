"""Benchmark: weight sharing (Alg 6) and the compressed file on full-size VGG16 (138M weights).

Run on demand (not part of the tests): ``.venv/bin/python bench/bench_share.py``. Needs ~6 GB
of memory and a few minutes on one CPU core. Prints one table per step:

1. Weight sharing of every prunable layer of ``torchvision.models.vgg16()`` (random init,
   seed 0), 50% globally magnitude-pruned (threshold by ``np.partition``), 8 bits for
   convolutions and 5 bits for linears (the paper's Sec. 3.2): rclib's time and quantisation
   MSE over the non-zero weights, with and without the split-merge refinement, against
   scikit-learn ``KMeans`` with the same linearly spaced init, ``n_init=1``, the same
   ``max_iter``. scikit-learn on all layers would take too long: it is timed on a random sample
   of 1M non-zero weights of the biggest linear and the biggest convolution, and its time is
   extrapolated linearly in the number of weights (said in the output).
2. ``save_compressed`` / ``load_compressed`` at 50% and 92.5% pruning: encode and decode time,
   exactness, and the sizes in MB (10^6 bytes): dense safetensors, the paper's approximate size
   (non-zeros x 32 bit), the paper's weight-shared formula, the real file, the entropy bound.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rclib import codec, models, share, sizes  # noqa: E402

MAX_ITER = 300
BITS = {"conv": 8, "linear": 5}
SAMPLE = 1_000_000


def vgg16_model() -> models.VGG:
    """torchvision's VGG16 (random init) inside rclib's VGG wrapper, so the file records it."""
    torch.manual_seed(0)
    spec = dict(model="vgg16", width=64, hidden=4096, batch_norm=False, dropout=0.5,
                num_classes=1000, input_shape=[3, 224, 224], mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225])
    return models.from_spec(spec)


def global_prune(model, dense: dict[str, np.ndarray], rate: float) -> None:
    """Zero the ``rate`` fraction of smallest-magnitude weights over all prunable layers."""
    mags = np.concatenate([np.abs(w).reshape(-1) for w in dense.values()])
    k = int(rate * mags.size)
    thr = np.partition(mags, k)[k]  # the k-th smallest |w|: O(N), vs ~30 s for torch's topk
    del mags
    with torch.no_grad():
        for name, m in models.prunable_layers(model):
            w = dense[name]
            m.weight.copy_(torch.from_numpy(np.where(np.abs(w) < thr, np.float32(0), w)))


def kind(m) -> str:
    return "conv" if isinstance(m, torch.nn.Conv2d) else "linear"


def bench_sharing(model) -> dict[str, np.ndarray]:
    layers = models.prunable_layers(model)
    rows = []
    shared = {}
    for refine in (1000, 0):
        t0 = time.perf_counter()
        sse, n = 0.0, 0
        for name, m in layers:
            w = m.weight.detach().numpy()
            book = share.share_tensor(w, BITS[kind(m)], iters=MAX_ITER, refine=refine)
            q = book.centroids[book.indices]
            sse += float(np.sum((w.reshape(-1)[book.positions].astype(np.float64) - q) ** 2))
            n += book.positions.size
            if refine:
                shared[name] = book.dense()
        rows.append((f"rclib kmeans_1d (refine={refine})", time.perf_counter() - t0, sse / n, "all layers, measured"))
    nnz = {name: int(np.count_nonzero(m.weight.detach().numpy())) for name, m in layers}

    # scikit-learn on 1M-weight samples of the biggest linear and the biggest convolution
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    est_time, sample_rows = 0.0, []
    for kd in ("linear", "conv"):
        name, m = max(((n_, m_) for n_, m_ in layers if kind(m_) == kd), key=lambda t: nnz[t[0]])
        w = m.weight.detach().numpy().reshape(-1)
        x = rng.choice(w[w != 0], size=min(SAMPLE, nnz[name]), replace=False)
        k = 2 ** BITS[kd]
        init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
        with threadpool_limits(1):  # rclib runs on one core too
            t0 = time.perf_counter()
            km = KMeans(k, init=init, n_init=1, max_iter=MAX_ITER).fit(x.reshape(-1, 1).astype(np.float64))
            t_sk = time.perf_counter() - t0
        mse_sk = float(np.mean((x - km.cluster_centers_.ravel()[km.labels_]) ** 2))
        t0 = time.perf_counter()
        c, lab = share.kmeans_1d(x, k, iters=MAX_ITER)
        t_rc = time.perf_counter() - t0
        mse_rc = float(np.mean((x - c[lab]) ** 2))
        n_kind = sum(v for n_, v in nnz.items() if kind(dict(layers)[n_]) == kd)
        est_time += t_sk * n_kind / x.size
        sample_rows.append((f"{name} ({kd}, k={k}) {x.size:,} sampled", t_sk, mse_sk, km.n_iter_, t_rc, mse_rc))
    rows.append(("scikit-learn KMeans (1 thread)", est_time, float("nan"),
                 "EXTRAPOLATED linearly from the 1M samples below"))

    print(f"\n## Weight sharing of VGG16, 50% global pruning, {sum(nnz.values()):,} non-zero weights, "
          f"bits {BITS}, max_iter {MAX_ITER}\n")
    print("| method | time (s) | MSE (non-zeros) | note |\n|---|---:|---:|---|")
    for r in rows:
        mse = "" if np.isnan(r[2]) else f"{r[2]:.4e}"
        print(f"| {r[0]} | {r[1]:.1f} | {mse} | {r[3]} |")
    print("\n| sample | sklearn time (s) | sklearn MSE | sklearn iters | rclib time (s) | rclib MSE | rclib/sklearn MSE |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in sample_rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.4e} | {r[3]} | {r[4]:.2f} | {r[5]:.4e} | {r[5] / r[2]:.3f} |")
    return shared


def bench_file(model, rate: float, tmp: Path) -> list:
    t0 = time.perf_counter()
    share.weight_share(model, BITS)
    t_share = time.perf_counter() - t0
    path = tmp / f"vgg16-{rate}.rclz"
    t0 = time.perf_counter()
    nbytes = codec.save_compressed(model, path)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = codec.load_compressed(path)
    t_dec = time.perf_counter() - t0
    a, b = sizes.effective_state(model), sizes.effective_state(loaded)
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    del loaded, b
    rep = sizes.size_report(model)
    assert rep["file_bytes"] == nbytes
    return [rate, t_share, t_enc, t_dec, exact, rep, share.shared_size_mb(model, BITS)]


def main() -> int:
    torch.set_num_threads(1)
    model = vgg16_model()
    dense = {n: m.weight.detach().numpy().copy() for n, m in models.prunable_layers(model)}
    print(f"VGG16: {sum(w.size for w in dense.values()):,} prunable weights, "
          f"{models.count_parameters(model):,} parameters; numpy {np.__version__}, torch {torch.__version__}")
    global_prune(model, dense, 0.5)
    bench_sharing(model)

    results = []
    with tempfile.TemporaryDirectory() as d:
        for rate in (0.5, 0.925):
            global_prune(model, dense, rate)
            results.append(bench_file(model, rate, Path(d)))
    print("\n## Compressed file (save_compressed / load_compressed), sizes in MB = 10^6 bytes\n")
    print("| prune rate | share (s) | encode (s) | decode+rebuild (s) | exact | dense safetensors | "
          "approx (nnz x 32 bit) | approx WS (Eq 6, 8/5 bit) | real file | entropy bound |")
    print("|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|")
    for rate, t_s, t_e, t_d, exact, rep, ws in results:
        print(f"| {rate:.1%} | {t_s:.1f} | {t_e:.1f} | {t_d:.1f} | {'yes' if exact else 'NO'} | "
              f"{rep['dense_bytes'] / 1e6:.1f} | {rep['approx_bytes'] / 1e6:.1f} | {ws:.1f} | "
              f"{rep['file_bytes'] / 1e6:.1f} | {rep['entropy_bound_bytes'] / 1e6:.1f} |")
    print("\nThe paper's Table 1 (ImageNet-trained VGG16, 50% global pruning): 534.3 MB baseline, "
          "263.9 MB pruned, 45.5 MB pruned + weight-shared (formula, not a file).")
    return 0 if all(r[4] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
