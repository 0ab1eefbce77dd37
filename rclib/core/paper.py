"""The paper's reported numbers, quoted once, with where they come from.

Chapters put these beside our own results; nothing here is ever used as a result of ours.
Source: Shah & Shao, "Deep Compression with Adversarial Robustness via Decision Boundary
Smoothing" (2024), Table 1 (Sec. 3.4) and Table 2 (App. C).

Used by every chapter's "paper vs ours" cell.
"""

from __future__ import annotations

# Table 1: VGG16 on the 10k ImageNet-val test split; FGSM at epsilon 0.03; accuracies in %,
# "Approx Size" in the paper's "MB" (which unit it means is discussed in chapter 00).
TABLE1 = {
    "Baseline": {"accuracy": 71.8, "robust_accuracy": 12.0, "approx_size_mb": 534.3},
    "Pruned": {"accuracy": 57.0, "robust_accuracy": 5.8, "approx_size_mb": 263.9},
    "Pruned + Retrained": {"accuracy": 64.2, "robust_accuracy": 10.3, "approx_size_mb": 263.9},
    "Pruned + Adv Ret.": {"accuracy": 54.6, "robust_accuracy": 25.6, "approx_size_mb": 263.9},
    "Pruned + Adv Ret. + WS": {"accuracy": 55.5, "robust_accuracy": 23.9, "approx_size_mb": 45.5},
}
TABLE1_EPSILON = 0.03  # App. C, Table 2
TABLE1_PRUNE_RATE = 0.5  # global unstructured pruning (Sec. 3.4)

# Table 2 (App. C): the robust retraining hyper-parameters
APPENDIX_C = {
    "epochs": 1, "batch_size": 128, "pruning_method": "L1Unstructured", "prune_amount": 0.5,
    "optimizer": "SGD", "lr": 0.005, "weight_decay": 0.005, "momentum": 0.9, "epsilon": 0.03,
    "margin_weight": 0.1, "conv_bits": 8, "linear_bits": 5,
}

# App. B: VGG16's structure
VGG16_CONV, VGG16_POOL, VGG16_LINEAR = 13, 5, 3

# Han et al. (2016), Deep Compression, Table 4 / Sec. 5: VGG16 pruned to 7.5% of its weights,
# quantised (8-bit conv, 5-bit fc) and Huffman-coded: 552 MB -> 11.3 MB, 49x. Chapter 02.
DEEP_COMPRESSION_VGG16 = {"kept": 0.075, "dense_mb": 552.0, "compressed_mb": 11.3, "ratio": 49.0}
