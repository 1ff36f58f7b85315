"""The per-sample engine: per-layer rules in one registry, a generic fallback, and the pass
that runs them. Importing this package registers every built-in rule."""

from . import conv, conv_transpose, linear  # noqa: F401  (register their rules)
from .engine import per_sample_unit_saliency
from .registry import find_rule, register_rule, register_units
from .routing import Routing, RoutingCache, route
from .selection import SelectedParameter, Selection, select_parameters

__all__ = [
    "Routing",
    "RoutingCache",
    "SelectedParameter",
    "Selection",
    "find_rule",
    "per_sample_unit_saliency",
    "register_rule",
    "register_units",
    "route",
    "select_parameters",
]
