"""The per-sample engine, read bottom up:

* :mod:`.rules` (one file per layer family) register per-layer rules in :mod:`.registry`;
  a rule gives a layer's per-sample gradients in one of the forms of :mod:`.grads`;
* :mod:`.reductions`: what a unit's gradient becomes (``mean_abs``, ``mean``, ``rms``),
  one object each, with their closed forms and pull-backs;
* :mod:`.policy` (with :mod:`.compiled`): every device-dependent choice of a pass;
* :mod:`.selection` and :mod:`.routing`: which parameters, and which of them the rules
  take (the rest goes to :mod:`.fallback`);
* :mod:`.engine`: the pass itself (:class:`~.engine.SaliencyPass`), with
  :mod:`.unit_values` reducing each layer; :mod:`.second_order`: the input gradient of a
  weighted saliency.

Importing this package registers every built-in rule.
"""

from . import rules  # noqa: F401  (register the built-in rules)
from .call import CallInputs, LayerCall
from .engine import SaliencyPass, unit_saliency
from .grads import ChunkedGrad, DenseGrad, LowRankGrad, PerSampleGrad
from .policy import KernelPolicy
from .reductions import REDUCTIONS, Reduction, get_reduction
from .registry import LayerRule, explain_rule, find_rule, register_rule, register_units
from .routing import Routing, RoutingCache, RoutingReport, route, routing_report
from .selection import SelectedParameter, Selection, select_parameters

__all__ = [
    "REDUCTIONS",
    "CallInputs",
    "ChunkedGrad",
    "DenseGrad",
    "KernelPolicy",
    "LayerCall",
    "LayerRule",
    "LowRankGrad",
    "PerSampleGrad",
    "Reduction",
    "Routing",
    "RoutingCache",
    "RoutingReport",
    "SaliencyPass",
    "SelectedParameter",
    "Selection",
    "explain_rule",
    "find_rule",
    "get_reduction",
    "register_rule",
    "register_units",
    "route",
    "routing_report",
    "select_parameters",
    "unit_saliency",
]
