"""The per-layer rules, one file per layer family; importing this package registers them.

Each file registers its rules with :func:`~captum_paramsal.per_sample.registry.register_rule`
and, where a parameter's units are not along index 0, its grouping with
:func:`~captum_paramsal.per_sample.registry.register_units`. A new layer type is one new
file here (and one import below).
"""

from . import attention, conv, conv_transpose, embedding, layer_norm, linear, recurrent  # noqa: F401  (register)

#: rule files for the layers of other libraries, imported the first time the registry meets a
#: layer from that library (importing transformers' modeling code takes seconds; a model
#: without such layers never pays it)
LIBRARY_RULES = {"transformers": ("hf_conv1d", "hf_norms", "hf_vit")}
