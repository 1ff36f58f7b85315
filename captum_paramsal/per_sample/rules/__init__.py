"""The per-layer rules, one file per layer family; importing this package registers them.

Each file registers its rules with :func:`~captum_paramsal.per_sample.registry.register_rule`
and, where a parameter's units are not along index 0, its grouping with
:func:`~captum_paramsal.per_sample.registry.register_units`. A new layer type is one new
file here (and one import below).
"""

from . import conv, conv_transpose, layer_norm, linear, recurrent  # noqa: F401  (register their rules)
