"""Cache keys derived from what a step reads: a :class:`Step` names a cached result and declares,
once and beside the function that computes it, the config groups (:data:`GROUPS`) or single
fields it reads. ``core.artifacts`` computes the key from exactly those fields, so a field a
step reads can never be missing from its key, and a field it does not read never invalidates it.

Used by every cached step (``rclib.experiments``) and by ``core.artifacts``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rclib.core.config import FIELD_NAMES

# What each field is about. A cached step declares the groups (or single fields) it reads
# (``core.artifacts.Step``) and its cache key is computed from exactly those fields, so a key
# cannot miss a field its step reads. Every field is in one group (a test checks it). ``run``
# says how a run computes, not what: it is never part of a key (where the work runs, the
# compute kind, is keyed separately).
GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("profile", "device", "threads", "num_workers", "pin_memory", "persistent_workers", "decoded_cache",
            "non_blocking", "cudnn_benchmark", "channels_last", "precision", "eval_batch_size"),
    "seed": ("seed",),
    "seeds": ("seeds",),
    "data": ("dataset", "data_dir", "image_size", "train_size", "test_size", "test_fraction"),
    "model": ("model", "width", "hidden", "batch_norm", "dropout", "weights", "head_epochs"),
    "train": ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs"),
    "attack": ("epsilon", "epsilons"),
    "pruning": ("prune_rate", "prune_rates", "prune_step", "hurt_rate"),
    "latency": ("latency_batch", "latency_repeats"),
    "retrain": ("retrain_epochs", "retrain_optimizer", "retrain_lr", "retrain_momentum", "retrain_weight_decay"),
    "sharing": ("conv_bits", "linear_bits"),
    "sizes": ("size_model",),
    "alg7": ("adv_epsilon", "margin_weight", "margin_on", "adv_epochs"),
    "maps": ("map_rates", "resolution", "local_examples", "local_resolution"),
    "strong": ("attack_sample", "apgd_steps", "apgd_targets", "square_queries"),
}


def fields_of(*names: str) -> tuple[str, ...]:
    """The Config fields of ``names``, each a group of :data:`GROUPS` or a single field, sorted
    and without repeats. ``ValueError`` for a name that is neither."""
    out: set[str] = set()
    for name in names:
        if name in GROUPS:
            out.update(GROUPS[name])
        elif name in FIELD_NAMES:
            out.add(name)
        else:
            raise ValueError(f"{name!r} is neither a config group ({', '.join(GROUPS)}) nor a config field")
    return tuple(sorted(out))


@dataclass(frozen=True)
class Step:
    """A cached step: its name (the artifact folder's prefix) and what it reads of the config,
    as groups of :data:`GROUPS` or single fields. Its cache key is computed from exactly
    these fields (:meth:`fields`), declared once beside the function that computes the step.

    Example:
        >>> BASELINE = Step("baseline", ("seed", "data", "model", "train"))
    """

    name: str
    reads: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"step name {self.name!r} must be letters, digits, '-' or '_'")
        fields_of(*self.reads)  # an unknown group or field fails where the step is declared

    def fields(self) -> tuple[str, ...]:
        """The Config fields in this step's key."""
        return fields_of(*self.reads)

    def named(self, name: str) -> "Step":
        """The same reads under another name (one step per variant, e.g. each retraining)."""
        return Step(name, self.reads)

    def reading(self, *more: str) -> "Step":
        """This step reading ``more`` groups or fields besides its own."""
        return Step(self.name, self.reads + tuple(more))
