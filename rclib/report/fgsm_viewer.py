"""A JupyterLab viewer of FGSM examples (ipywidgets), and its static figure.

:class:`AdversarialViewer` (or :func:`adversarial_viewer`): FGSM examples (clean image,
perturbation, adversarial image, predicted labels) under an epsilon slider. Static twin:
:func:`adversarial_figure`, which the book shows (the published book has no kernel, and widgets
load their JavaScript from a CDN).

Used by chapter 03 (boundary smoothness).
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import ipywidgets as ipw
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from rclib.nn import train
from rclib.report import plots
from rclib.report.widget_parts import MAX_EPS, html_table, png_output
from rclib.robust import attacks


def adversarial_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, Any]:
    """FGSM examples and the model's predictions on both sides.

    Returns:
        ``{"x_adv", "pred_clean", "pred_adv"}`` (tensors on the CPU) and
        ``"perturbation_max"`` = max |x_adv - x| (``eps`` unless clamping to [0, 1] cut every
        pixel short).

    Example:
        >>> p = adversarial_predictions(model, x, y, 0.1)
        >>> (p["pred_adv"] != y).float().mean()   # error rate under attack

    Used by chapter 03 (boundary smoothness), through :func:`adversarial_figure` and the viewer.
    """
    device = train.model_device(model)
    xd, yd = x.to(device), y.to(device)
    x_adv = attacks.fgsm(model, xd, yd, float(eps))
    pred_clean = train.predict(model, xd).argmax(1)
    pred_adv = train.predict(model, x_adv).argmax(1)
    x_adv = x_adv.cpu()
    return dict(x_adv=x_adv, pred_clean=pred_clean.cpu(), pred_adv=pred_adv.cpu(),
                perturbation_max=float((x_adv - x.cpu()).abs().max()) if len(x) else 0.0)


def _draw_adversarial(x, x_adv, y, pred_clean, pred_adv, class_names, eps: float, n: int) -> Figure:
    fig = plots.adversarial_examples(x, x_adv, y, pred_clean, pred_adv, class_names, eps, n=n)
    n = min(n, len(x))
    changed = int((pred_clean[:n] != pred_adv[:n]).sum())
    wrong = int((pred_adv[:n] != y[:n]).sum())
    fig.suptitle(f"FGSM, eps = {eps:g}: {changed} of {n} predictions changed, {wrong} wrong "
                 "(red: misclassified)", fontsize=10)
    # the perturbation row is drawn on the signed scale [-eps, eps]; a colourbar says so
    axes = np.asarray(fig.axes).reshape(3, -1)
    fig.subplots_adjust(right=0.88)
    pos = axes[1, -1].get_position()
    cax = fig.add_axes((0.9, pos.y0, 0.015, pos.height))
    fig.colorbar(axes[1, -1].images[0], cax=cax, label="x_adv - x")
    return fig


def adversarial_figure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       class_names: Sequence[str], n: int = 6) -> Figure:
    """FGSM at ``eps`` on the first ``n`` of ``x``: rows clean image, perturbation (signed
    colour scale from -eps to +eps with a colourbar, so even a small step is visible),
    adversarial image; column titles are the predicted labels (red when wrong).

    Args:
        model: the classifier (pixels in [0, 1]); evaluated in eval mode.
        x, y: inputs (N, C, H, W) in [0, 1] and labels (N,), e.g. ``datasets.first_batch(splits.test, 6)``.
        eps: the FGSM step (>= 0).
        class_names: label names (``splits.class_names``).
        n: examples shown, default 6.

    Returns:
        The matplotlib Figure.

    Example:
        >>> x, y = datasets.first_batch(splits.test, 6)
        >>> adversarial_figure(model, x, y, 0.1, splits.class_names)

    Used by chapter 03 (boundary smoothness), the static stand-in for :class:`AdversarialViewer`.
    """
    x, y = x[:n], y[:n]
    p = adversarial_predictions(model, x, y, eps)
    return _draw_adversarial(x, p["x_adv"], y, p["pred_clean"], p["pred_adv"], class_names, float(eps), n)


class AdversarialViewer(ipw.VBox):
    """Live FGSM examples: ``epsilon`` FloatSlider (0 to 0.3) and ``index`` IntSlider (the first
    of the ``n`` examples shown); ``status`` HTML and ``output`` Output with
    :func:`adversarial_figure`'s picture. ``state`` (also ``last``) holds what is shown:
    ``eps, index, labels, pred_clean, pred_adv`` (lists of ints), ``changed``, ``wrong`` and
    ``perturbation_max``; ``figure`` the last Figure.

    Args:
        model: the classifier; not modified.
        x, y: a pool of inputs in [0, 1] and labels (e.g. ``datasets.first_batch(splits.test, 60)``).
        class_names: ``splits.class_names``.
        eps: initial epsilon, default 0.1.
        n: examples shown at once, default 6.
        index: initial first example, default 0.

    Example:
        >>> v = AdversarialViewer(model, x, y, splits.class_names)
        >>> v.epsilon.value = 0.2
        >>> v.state["pred_adv"]

    Used by chapter 03 (boundary smoothness); run ``make lab`` for the live version.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], *,
                 eps: float = 0.1, n: int = 6, index: int = 0):
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
        self.model, self.x, self.y, self.class_names = model, x, y, list(class_names)
        self.n = max(1, min(int(n), len(x)))
        self.state: dict[str, Any] = {}
        self.figure: Figure | None = None
        self.epsilon = ipw.FloatSlider(value=eps, min=0.0, max=MAX_EPS, step=0.01, description="FGSM eps",
                                       readout_format=".2f", continuous_update=False,
                                       style={"description_width": "initial"})
        # browsing needs more inputs than are shown at once: the chapter passes a pool of test inputs
        self.index = ipw.IntSlider(value=index, min=0, max=len(x) - self.n, description="first example",
                                   continuous_update=False, disabled=len(x) <= self.n,
                                   style={"description_width": "initial"})
        self.status = ipw.HTML()
        self.output = ipw.Output()
        super().__init__(children=[ipw.HBox([self.epsilon, self.index]), self.status, self.output])
        for control in (self.epsilon, self.index):
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    @property
    def last(self) -> dict[str, Any]:
        """The predictions currently shown (same dict as ``state``)."""
        return self.state

    def update(self) -> dict[str, Any]:
        """Attack the shown examples at the current epsilon, redraw, refresh ``state``."""
        eps, i = float(self.epsilon.value), int(self.index.value)
        x, y = self.x[i:i + self.n], self.y[i:i + self.n]
        try:
            p = adversarial_predictions(self.model, x, y, eps)
            fig = _draw_adversarial(x, p["x_adv"], y, p["pred_clean"], p["pred_adv"], self.class_names, eps, self.n)
            self.output.outputs = (png_output(fig),)
            plt.close(fig)
        except Exception as err:
            self.status.value = f"<b style='color:#b00'>error: {html.escape(repr(err))}</b>"
            raise
        self.figure = fig
        labels, pc, pa = y.tolist(), p["pred_clean"].tolist(), p["pred_adv"].tolist()
        self.state.clear()
        self.state.update(eps=eps, index=i, labels=labels, pred_clean=pc, pred_adv=pa,
                          changed=sum(a != b for a, b in zip(pc, pa)),
                          wrong=sum(a != t for a, t in zip(pa, labels)),
                          perturbation_max=p["perturbation_max"])
        names = self.class_names
        self.status.value = html_table([
            ("examples", f"{i} to {i + len(labels) - 1}"),
            ("true", " ".join(names[t] for t in labels)),
            ("clean prediction", " ".join(names[t] for t in pc)),
            (f"FGSM prediction (eps {eps:g})", " ".join(names[t] for t in pa)),
            ("max |x_adv - x|", f"{self.state['perturbation_max']:.3f}")])
        return self.state


def adversarial_viewer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
                       **kwargs: Any) -> AdversarialViewer:
    """An :class:`AdversarialViewer` (an ``ipywidgets.VBox``); ``kwargs`` as for it.

    Example:
        >>> adversarial_viewer(model, *datasets.first_batch(splits.test, 60), splits.class_names)

    Used by chapter 03 (boundary smoothness).
    """
    return AdversarialViewer(model, x, y, class_names, **kwargs)
