"""Attention heads: one finder per family of attention block.

Head ``h`` of an attention block is the rows of the query, key and value projections that
compute it (``h * head_dim ... (h + 1) * head_dim - 1`` of each) and the columns of the
output projection that read it. With grouped-query attention (fewer key/value heads than
query heads, as in Llama) a key/value head is shared by several query heads: the heads
entry then holds the query rows and output columns, and a second ``"kv_heads"`` entry,
named ``<block>.kv``, the key and value rows of each key/value head.
"""

from __future__ import annotations

from typing import List, Optional

from torch import nn

from .groups import FoundGroup, in_features, linear_like, out_features, output_axis, register_finder


def _heads(block: str, q: str, k: str, v: str, o: str, modules, heads: int, head_dim: int, kv_heads: int):
    """The groups of a block with separate q, k, v, o projections (``modules`` maps each
    relative name to its layer), ``kv_heads`` key/value heads."""
    q_m, k_m, v_m, o_m = (modules[n] for n in (q, k, v, o))
    if out_features(q_m) != heads * head_dim or in_features(o_m) != heads * head_dim:
        return None
    if out_features(k_m) != kv_heads * head_dim or out_features(v_m) != kv_heads * head_dim:
        return None
    prefix = f"{block}." if block else ""

    def part(name: str, module: nn.Module, axis: int):
        return (f"{prefix}{name}.weight", axis, 0, head_dim)

    queries = [part(q, q_m, output_axis(q_m)), part(o, o_m, 1 - output_axis(o_m))]
    keys = [part(k, k_m, output_axis(k_m)), part(v, v_m, output_axis(v_m))]
    if kv_heads == heads:
        return [FoundGroup("", "heads", heads, (queries[0], *keys, queries[1]))]
    return [FoundGroup("", "heads", heads, tuple(queries)), FoundGroup("kv", "kv_heads", kv_heads, tuple(keys))]


def _count(module: nn.Module, *names: str) -> Optional[int]:
    """The first of ``names`` that the module or its ``config`` has as a positive int."""
    config = getattr(module, "config", None)
    for source in (module, config):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


@register_finder("heads")
def torch_multihead_attention(module: nn.Module) -> Optional[List[FoundGroup]]:
    """``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``): the q, k, v rows
    of ``in_proj_weight`` (or of ``q/k/v_proj_weight``) and the columns of ``out_proj.weight``."""
    if not isinstance(module, nn.MultiheadAttention):
        return None
    heads, head_dim, embed = module.num_heads, module.head_dim, module.embed_dim
    if module._qkv_same_embed_dim:
        rows = [("in_proj_weight", 0, offset, head_dim) for offset in (0, embed, 2 * embed)]
    else:
        rows = [(f"{n}_proj_weight", 0, 0, head_dim) for n in ("q", "k", "v")]
    return [FoundGroup("", "heads", heads, (*rows, ("out_proj.weight", 1, 0, head_dim)))]


@register_finder("heads")
def query_key_value_and_output(module: nn.Module) -> Optional[List[FoundGroup]]:
    """BERT-like blocks (BERT, RoBERTa, ELECTRA ...): a child with ``query``, ``key`` and
    ``value`` Linear layers and its heads count, beside an ``output`` child with a ``dense``
    Linear that reads them; the group is named after the block (``...attention``)."""
    output = getattr(getattr(module, "output", None), "dense", None)
    if not isinstance(output, nn.Linear):
        return None
    for child_name, child in module.named_children():
        layers = {n: getattr(child, n, None) for n in ("query", "key", "value")}
        if not all(isinstance(layer, nn.Linear) for layer in layers.values()):
            continue
        heads = _count(child, "num_attention_heads", "num_heads")
        if heads is None or out_features(layers["query"]) % heads:
            return None
        head_dim = _count(child, "attention_head_size", "head_dim") or out_features(layers["query"]) // heads
        kv_heads = out_features(layers["key"]) // head_dim
        modules = {f"{child_name}.{n}": layer for n, layer in layers.items()}
        modules["output.dense"] = output
        return _heads("", f"{child_name}.query", f"{child_name}.key", f"{child_name}.value", "output.dense",
                      modules, heads, head_dim, kv_heads)
    return None


@register_finder("heads")
def separate_projections(module: nn.Module) -> Optional[List[FoundGroup]]:
    """Blocks with their own q, k, v and output projections: Llama, Mistral, Qwen, ViT
    (``q_proj, k_proj, v_proj, o_proj``; grouped-query attention gives a ``kv_heads`` entry
    too), T5 (``q, k, v, o``), BART-like (``q_proj, k_proj, v_proj, out_proj``)."""
    for names in (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                  ("q", "k", "v", "o")):
        modules = {n: getattr(module, n, None) for n in names}
        if not all(isinstance(m, nn.Linear) for m in modules.values()):
            continue
        heads = _count(module, "num_heads", "n_heads", "num_attention_heads")
        if heads is None or out_features(modules[names[0]]) % heads:
            return None
        head_dim = _count(module, "head_dim", "key_value_proj_dim", "attention_head_size")
        head_dim = head_dim or out_features(modules[names[0]]) // heads
        kv_heads = _count(module, "num_key_value_heads") or out_features(modules[names[1]]) // head_dim
        return _heads("", *names, modules, heads, head_dim, kv_heads)
    return None


@register_finder("heads")
def gpt2_attention(module: nn.Module) -> Optional[List[FoundGroup]]:
    """GPT-2's self-attention: the q, k and v columns of ``c_attn`` (a ``Conv1D``, weight
    ``(d, 3d)``) and the rows of ``c_proj`` (weight ``(d, d)``: its input features). Cross
    attention (``q_attn``) is left to rows."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if not (linear_like(c_attn) and linear_like(c_proj)) or getattr(module, "is_cross_attention", False):
        return None
    heads, head_dim = _count(module, "num_heads"), _count(module, "head_dim")
    embed = _count(module, "embed_dim", "split_size")
    if heads is None or head_dim is None or embed is None or out_features(c_attn) != 3 * embed:
        return None
    axis = output_axis(c_attn)
    columns = [("c_attn.weight", axis, offset, head_dim) for offset in (0, embed, 2 * embed)]
    return [FoundGroup("", "heads", heads, (*columns, ("c_proj.weight", 1 - output_axis(c_proj), 0, head_dim)))]
