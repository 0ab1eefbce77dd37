"""The models Table 1 compares, and how each is made: typed values with a name for display.

A :class:`Variant` says what is done to the baseline (pruned or not, how it is retrained, weight
shared or not); its ``label`` is only what tables and figures show. Code decides by the fields,
never by the label. A :class:`Retraining` is one cached retraining step (its ``name`` keys the
artifact and is what ``python -m rclib retrain --step`` takes).

========================  ===================================================================
retraining                the model (Table 1 / chapter 05 row)
========================  ===================================================================
``clean``                 clean cross-entropy only ("Pruned + Retrained", the control)
``alg7``                  Alg 7: FGSM at ``adv_epsilon`` + margin ``margin_weight``
``alg7-no-margin``        Alg 7 with ``margin_weight = 0`` (FGSM training only)
``alg7-margin-only``      Alg 7 with ``eps = 0`` (clean data + margin only)
``alg7-pgd``              Alg 7 with PGD examples (Madry et al.'s adversarial training)
========================  ===================================================================

Used by chapters 04-06 and ``python -m rclib retrain``.
"""

from __future__ import annotations

from dataclasses import dataclass

MADRY_STEPS = 7  # PGD steps per batch when retraining the Madry-style row (Madry et al.'s CIFAR value)


@dataclass(frozen=True)
class Retraining:
    """How a globally pruned copy of the baseline is retrained for ``cfg.adv_epochs`` epochs.

    Attributes:
        name: the artifact's and the command line's name.
        adversarial: Algorithm 7 (adversarial examples plus the margin loss, Eq 10) or plain
            clean cross-entropy.
        attack: the attack crafting Algorithm 7's examples (``"fgsm"`` as in the paper, or ``"pgd"``).
        perturbs: False trains on clean inputs (``eps = 0``).
        margin: False drops the margin term (``margin_weight = 0``).
    """

    name: str
    adversarial: bool = True
    attack: str = "fgsm"
    perturbs: bool = True
    margin: bool = True

    def reads(self) -> tuple[str, ...]:
        """The Alg 7 fields this retraining reads (beyond the optimiser's): its cache key."""
        if not self.adversarial:
            return ()
        return ("margin_on",) + (("adv_epsilon",) if self.perturbs else ()) + (("margin_weight",) if self.margin else ())


CLEAN = Retraining("clean", adversarial=False)
ALG7 = Retraining("alg7")
NO_MARGIN = Retraining("alg7-no-margin", margin=False)
MARGIN_ONLY = Retraining("alg7-margin-only", perturbs=False)
PGD = Retraining("alg7-pgd", attack="pgd")
RETRAININGS = {r.name: r for r in (CLEAN, ALG7, NO_MARGIN, MARGIN_ONLY, PGD)}


@dataclass(frozen=True)
class Variant:
    """One model of Table 1, its ablation or chapter 05: what is done to the baseline.

    Attributes:
        label: its name in tables and figures (never used to decide anything).
        pruned: globally pruned (Alg 1) at the table's rate.
        retraining: how it is retrained after pruning (None: not retrained).
        shared: weight-shared afterwards (Alg 6 with ``conv_bits`` / ``linear_bits``).
    """

    label: str
    pruned: bool = True
    retraining: Retraining | None = None
    shared: bool = False

    def __str__(self) -> str:
        return self.label


BASELINE = Variant("Baseline", pruned=False)
PRUNED = Variant("Pruned")
RETRAINED = Variant("Pruned + Retrained", retraining=CLEAN)
ADV = Variant("Pruned + Adv Ret.", retraining=ALG7)
ADV_WS = Variant("Pruned + Adv Ret. + WS", retraining=ALG7, shared=True)
FGSM_ONLY = Variant("Pruned + FGSM training only (lambda 0)", retraining=NO_MARGIN)
MARGIN_ONLY_ROW = Variant("Pruned + margin only (eps 0)", retraining=MARGIN_ONLY)
MADRY = Variant("Pruned + Adv Ret. with PGD (Madry-style)", retraining=PGD)

TABLE1 = (BASELINE, PRUNED, RETRAINED, ADV, ADV_WS)  # the paper's Table 1, in its order
ABLATION = (FGSM_ONLY, MARGIN_ONLY_ROW)  # Alg 7 without one of its two ingredients (chapter 04)
BY_LABEL = {v.label: v for v in TABLE1 + ABLATION + (MADRY,)}


def labels(variants) -> list[str]:
    """The display labels of ``variants``, in order (table rows, figure legends)."""
    return [v.label for v in variants]
