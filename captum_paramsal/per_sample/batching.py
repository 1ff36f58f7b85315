"""Captum's convention for ``additional_forward_args`` (and keyword arguments): a tensor
whose first dimension is the batch size is per sample; anything else is shared by all
samples."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import Tensor


def is_per_sample(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def slice_batch(values: Tuple[Any, ...], batch: int, start: int, stop: int) -> Tuple[Any, ...]:
    """Samples ``start:stop`` of every per-sample value; shared values unchanged."""
    return tuple(v[start:stop] if is_per_sample(v, batch) else v for v in values)


def slice_kwargs(values: Dict[str, Any], batch: int, start: int, stop: int) -> Dict[str, Any]:
    """:func:`slice_batch` of keyword arguments."""
    return {k: v[start:stop] if is_per_sample(v, batch) else v for k, v in values.items()}
