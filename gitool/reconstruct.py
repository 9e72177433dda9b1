"""Input reconstruction methods by name: ``gitool reconstruct --method NAME``.

Each entry of :data:`RECON_METHODS` is a :class:`gitool.methods.Method` (what it
accepts, its options with defaults and constraints, its adapter). An adapter takes the
update, its options, the recovered labels and features (attack results, either may be
None) and a progress callback, and returns a `ReconOutcome`. The math lives in pure
tensor functions under ``gitool.attacks``. The facts a reconstruction needs depend on
what it is given (labels or not), so the adapters check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gitool.methods import Method, method_help, resolve

ANY = ("single", "batch", "multistep")


@dataclass
class ReconOutcome:
    """Recovered images (B x C x H x W in [0, 1]) with per-layer or per-iteration
    diagnostics and a few human lines for the terminal."""

    method: str
    images: Any
    diagnostics: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


RECON_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fc", "reconstruct", "fully-connected nets, layer by layer from the gradient (Wang et al. 2024)", ANY, (),
           "gitool.reconstruct_analytic:AnalyticOptions", "gitool.reconstruct_analytic:reconstruct_fc"),
    Method("conv", "reconstruct", "conv stacks with an FC head, from gradient constraints (R-CONV)", ANY, (),
           "gitool.reconstruct_analytic:AnalyticOptions", "gitool.reconstruct_analytic:reconstruct_conv"),
    Method("optimize", "reconstruct", "gradient matching (DLG / Inverting Gradients)", ANY, (),
           "gitool.reconstruct_optimize:OptimizeOptions", "gitool.reconstruct_optimize:reconstruct_optimize"),
)}

METHOD_HELP = method_help(RECON_METHODS)

Progress = Callable[[int, int, dict], None]  # (done, total, {"loss": ...})


def reconstruct(update, labels=None, features=None, method: str = "fc", options: dict[str, Any] | None = None,
                progress: Progress | None = None) -> ReconOutcome:
    entry = resolve(RECON_METHODS, method, "reconstruction method")
    return entry(update, options, RECON_METHODS, labels=labels, features=features, progress=progress)
