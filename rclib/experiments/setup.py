"""A configuration that can run here: values checked on their own (``core.config``), then against
the data on disk and this machine's memory (``data.checks``, ``nn.checks``), before any work.

Used by every chapter's first code cell (:func:`from_notebook`) and by ``python -m rclib``
(:func:`load`).
"""

from __future__ import annotations

from typing import Any

from rclib.core import config, params
from rclib.core.config import DEFAULT_PROFILE, FIELD_NAMES, Config
from rclib.data import checks as data_checks
from rclib.nn import checks as nn_checks


def feasible(cfg: Config) -> Config:
    """Raise ``ValueError`` (naming the parameter, the value and what is allowed) when ``cfg``
    cannot run here: missing or too small data, a weights file that does not fit the model,
    memory beyond the machine. Runs in well under a second (the model is sized on PyTorch's
    ``meta`` device); returns ``cfg`` unchanged when all is well."""
    defaults = config.profile_config(cfg.profile)  # sharpens messages: what the run changed
    shape = data_checks.dataset_shape(cfg)
    data_checks.check_split(cfg, shape)
    data_checks.check_sizes(cfg, shape)
    nn_checks.check_training(cfg, shape)
    nn_checks.check_memory(cfg, shape, defaults)
    nn_checks.check_weights(cfg, shape)
    return cfg


def load(profile: str = DEFAULT_PROFILE, **overrides: Any) -> Config:
    """:func:`rclib.core.config.load`, then :func:`feasible`: the config of a run that can start.

    Example:
        >>> cfg = load("smoke", epsilon=0.2)
        >>> cfg.epsilon
        0.2
    """
    return feasible(config.load(profile, **overrides))


def from_notebook(namespace: dict[str, Any]) -> Config:
    """The config of a chapter, from its ``parameters`` cell and what papermill injected.

    Every Config field is a parameter of every chapter: the parameters cell declares them all
    (:func:`parameters_source`), ``None`` meaning "the profile's value". A name papermill
    injected that is not a field stops the chapter here, with the list of known names.

    Args:
        namespace: the notebook's ``globals()``.

    Used by the first code cell of every chapter.
    """
    unknown = [n for n in params.injected_names(list(namespace.get("In", []))) if n not in FIELD_NAMES]
    if unknown:
        raise ValueError(config.unknown_message(unknown))
    profile = namespace.get("profile", DEFAULT_PROFILE)
    return load(profile, **{n: namespace.get(n) for n in FIELD_NAMES[1:]})
