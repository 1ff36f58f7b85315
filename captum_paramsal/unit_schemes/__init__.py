"""Unit schemes: what one column of a saliency profile is.

``units="rows"`` (the default) gives one unit per output row of each selected parameter (a
conv filter, a Linear layer's output neuron). Transformers are reasoned about in other
units, which span several parameters:

* ``units="heads"``: an attention **head**, the rows of the q, k and v projections that
  form it and the columns of the output projection that read it (:mod:`.heads`); with
  grouped-query attention the shared key/value heads are a second entry, ``<block>.kv``;
* ``units="neurons"``: an MLP **neuron**, a row of the up (and gate) projection and the
  matching column of the down projection (:mod:`.neurons`);
* several at once, ``units=("heads", "neurons")``, or per module,
  ``units={"transformer.h.11": "heads"}`` (the longest matching name prefix wins; what no
  prefix covers is rows).

Selected parameters that no head or neuron covers stay one unit per row. A group's value
is the reduction over all of its entries (``mean |g|`` over the head's q, k, v rows and
output columns together), computed from the engine's per-row and per-column values
exactly (:class:`.plan.UnitPlan`). Layout entries say what a unit is: their ``name`` is
the module (``"transformer.h.3.attn"``), their ``kind`` ``"heads"``, ``"kv_heads"``,
``"neurons"`` or ``"rows"``, their ``parts`` where each unit lies.

Families recognized: ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``'s MLP;
Hugging Face BERT-like, GPT-2, Llama-like (Mistral, Qwen), ViT, T5 and BART-like blocks. A
new family is one finder registered with :func:`register_finder`.

Examples::

    >>> from captum_paramsal import ParameterSaliency
    >>> ps = ParameterSaliency(gpt2, units="heads", loss_fn=..., output_fn=...)
    >>> [(e.name, e.kind, e.num_units) for e in ps.layout][:2]
    [('transformer.h.0.attn', 'heads', 12), ('transformer.h.0.mlp.c_fc.weight', 'rows', 3072)]
    >>> prof = ps.profile(ids, target=labels, additional_forward_args={"attention_mask": mask})
    >>> prof.top_k(3)[0]               # UnitScore(param='transformer.h.5.attn', unit=7, ...)
    >>> from captum_paramsal.interventions import turn_off
    >>> with turn_off(gpt2, prof.top_k(3)[0], layout=ps.layout):   # those three heads off
    ...     logits = gpt2(ids, attention_mask=mask).logits
"""

from .groups import UNIT_SCHEMES, FoundGroup, UnitGroup, find_groups, register_finder
from .plan import UnitPlan, UnitsSpec, group_part_indices, parse_units, plan_units

__all__ = [
    "UNIT_SCHEMES",
    "FoundGroup",
    "UnitGroup",
    "UnitPlan",
    "UnitsSpec",
    "find_groups",
    "group_part_indices",
    "parse_units",
    "plan_units",
    "register_finder",
]
