"""Reference statistics of saliency profiles: streaming, mergeable, saved without pickle.

Per unit ``u`` over a reference set (the paper: the whole validation set, with true
labels): ``mean[u]`` and the sample standard deviation ``std[u]`` (divide by N - 1),
accumulated in float64 by Welford/Chan updates, so batches, resumed runs and processes
combine exactly. Standardized saliency is ``z = (s - mean) / std'`` with ``std' = std``
where ``std > 1e-12`` and 1 elsewhere (dead units get z = 0, not inf).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from ._utils import atomic_write
from .layout import SaliencyLayout

FORMAT_NAME = "captum-paramsal/saliency-stats"
FORMAT_VERSION = "1"
#: Standard deviations at or below this are treated as 1: the unit does not vary.
STD_FLOOR = 1e-12


def layout_fingerprint(layout: SaliencyLayout, reduction: str, loss: str) -> str:
    """A short hash of what a profile's columns mean: names, shapes, units, reduction, loss."""
    description = {
        "params": layout.description(),
        "reduction": reduction,
        "loss": loss,
    }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class _Moments:
    count: int
    mean: Tensor  # float64 (F,)
    m2: Tensor  # float64 (F,): sum of squared deviations from the mean

    @staticmethod
    def of_batch(values: Tensor) -> _Moments:
        values = values.detach().to(torch.float64)
        mean = values.mean(0)
        return _Moments(values.shape[0], mean, ((values - mean) ** 2).sum(0))

    def merge(self, other: _Moments) -> _Moments:
        """Chan et al.'s pairwise update: exact for any split of the data."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return _Moments(count, mean, m2)


class SaliencyStats:
    """Per-unit mean and standard deviation of saliency over a reference set.

    Build with :meth:`ParameterSaliency.fit_stats`, or by hand with :meth:`empty` and
    :meth:`partial_fit`; combine runs with :meth:`merge`; persist with :meth:`save` /
    :meth:`load` (safetensors, no pickle).

    Attributes:
        layout: the columns the statistics describe.
        reduction, loss: how the profiles were computed.
        fingerprint: a hash of layout, reduction and loss; profiles of another
            fingerprint are refused.

    Examples::

        >>> stats = ps.fit_stats(val_loader)              # one streaming pass
        >>> stats.save("resnet50-val.safetensors")
        >>> stats = SaliencyStats.load("resnet50-val.safetensors")
        >>> ps = ParameterSaliency(model, stats=stats)
        >>> z = ps.attribute(images, target=labels)      # standardized saliency
    """

    def __init__(self, layout: SaliencyLayout, reduction: str, loss: str, moments: Optional[_Moments] = None):
        self.layout = layout
        self.reduction = reduction
        self.loss = loss
        self.fingerprint = layout_fingerprint(layout, reduction, loss)
        zeros = torch.zeros(layout.num_columns, dtype=torch.float64)
        self._moments = moments if moments is not None else _Moments(0, zeros, zeros.clone())

    @classmethod
    def empty(cls, layout: SaliencyLayout, reduction: str = "mean_abs", loss: str = "cross_entropy") -> SaliencyStats:
        return cls(layout, reduction, loss)

    # -- statistics ---------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self._moments.count

    @property
    def mean(self) -> Tensor:
        return self._moments.mean.clone()

    @property
    def var(self) -> Tensor:
        if self.count < 2:
            return torch.full_like(self._moments.m2, float("nan"))
        return self._moments.m2 / (self.count - 1)

    @property
    def std(self) -> Tensor:
        """Sample standard deviation (divides by N - 1); NaN with fewer than 2 samples."""
        return self.var.sqrt()

    def partial_fit(self, saliency: Tensor) -> SaliencyStats:
        """Add a batch of raw profiles ``(B, F)`` (in place); returns self."""
        if not isinstance(saliency, Tensor) or saliency.dim() != 2 or saliency.shape[1] != self.layout.num_columns:
            shape = tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
            raise ValueError(f"partial_fit takes (batch, {self.layout.num_columns}) profiles, got {shape}")
        if not bool(torch.isfinite(saliency).all()):
            raise ValueError("partial_fit got non-finite saliency values")
        if saliency.shape[0] > 0:
            self._moments = self._moments.merge(_Moments.of_batch(saliency.cpu()))
        return self

    def merge(self, other: SaliencyStats) -> SaliencyStats:
        """Statistics of both data sets together (a new object)."""
        self.check_compatible(other.fingerprint, what="statistics to merge")
        return SaliencyStats(self.layout, self.reduction, self.loss, self._moments.merge(other._moments))

    def all_reduce(self, group: Optional[Any] = None) -> SaliencyStats:
        """Across a ``torch.distributed`` group: every rank gets the statistics of all ranks.

        Each rank's moments are gathered and merged in rank order, so every rank ends with
        bit-identical statistics. Returns a new object.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        m = self._moments
        local = torch.cat([torch.tensor([float(m.count)], dtype=torch.float64), m.mean, m.m2]).to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        merged = _Moments(0, torch.zeros_like(m.mean), torch.zeros_like(m.m2))
        columns = m.mean.shape[0]
        for part in gathered:
            part = part.cpu()
            moments = _Moments(int(part[0].item()), part[1 : 1 + columns], part[1 + columns :])
            merged = merged.merge(moments)
        return SaliencyStats(self.layout, self.reduction, self.loss, merged)

    # -- standardization ----------------------------------------------------------------
    def check_compatible(self, fingerprint: str, what: str = "these profiles") -> None:
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"{what} have layout fingerprint {fingerprint}, but the statistics were computed for "
                f"{self.fingerprint} ({len(self.layout)} parameters, {self.layout.num_columns} units, "
                f"reduction={self.reduction!r}, loss={self.loss!r}): statistics from another model, "
                "parameter selection, reduction or loss cannot standardize them"
            )

    @property
    def scale(self) -> Tensor:
        """``std'``: the standard deviation where it exceeds 1e-12, else 1."""
        if self.count < 2:
            raise ValueError(f"standardizing needs statistics over at least 2 samples, these have {self.count}")
        std = self.std
        return torch.where(std > STD_FLOOR, std, torch.ones_like(std))

    def standardize(self, saliency: Tensor) -> Tensor:
        """``(s - mean) / std'`` in the dtype and on the device of ``saliency``."""
        if saliency.shape[-1] != self.layout.num_columns:
            raise ValueError(
                f"profiles have {saliency.shape[-1]} columns, the statistics {self.layout.num_columns}"
            )
        scale = self.scale.to(device=saliency.device, dtype=saliency.dtype)
        mean = self._moments.mean.to(device=saliency.device, dtype=saliency.dtype)
        return (saliency - mean) / scale

    # -- files ----------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file atomically (a temporary file, then a rename)."""
        from safetensors.torch import save as save_bytes

        tensors = {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": self._moments.mean.contiguous(),
            "m2": self._moments.m2.contiguous(),
        }
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "reduction": self.reduction,
            "loss": self.loss,
            "layout": json.dumps(self.layout.description()),
        }
        atomic_write(path, save_bytes(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> SaliencyStats:
        """Read a file written by :meth:`save`; a clear error for anything else."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no statistics file at {path}")
        with open(path, "rb") as f:
            payload = f.read()
        try:
            tensors = load_bytes(payload)
            metadata = _read_metadata(payload)
        except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {error}") from None
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is a safetensors file but not captum-paramsal saliency statistics")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has statistics format version {metadata.get('format_version')!r}; "
                f"this version of captum-paramsal reads {FORMAT_VERSION!r}"
            )
        try:
            layout = SaliencyLayout(json.loads(metadata["layout"]))
            mean, m2, count = tensors["mean"], tensors["m2"], int(tensors["count"])
            stats = cls(layout, metadata["reduction"], metadata["loss"], _Moments(count, mean, m2))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{path} has incomplete or inconsistent statistics: {error!r}") from None
        if stats.fingerprint != metadata["fingerprint"]:
            raise ValueError(f"{path}: the stored fingerprint does not match its stored layout (edited file?)")
        if mean.dtype != torch.float64 or mean.shape != (layout.num_columns,) or m2.shape != mean.shape:
            raise ValueError(f"{path}: statistics shapes do not match the layout's {layout.num_columns} units")
        if count < 0 or not bool(torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            raise ValueError(f"{path}: statistics contain invalid values")
        return stats

    def __repr__(self) -> str:
        return (
            f"SaliencyStats(count={self.count}, units={self.layout.num_columns}, "
            f"reduction={self.reduction!r}, loss={self.loss!r}, fingerprint={self.fingerprint})"
        )


def _read_metadata(payload: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (its JSON header)."""
    if len(payload) < 8:
        raise ValueError("file is shorter than a safetensors header")
    header_size = int.from_bytes(payload[:8], "little")
    if header_size > len(payload) - 8:
        raise ValueError("header runs past the end of the file")
    header = json.loads(payload[8 : 8 + header_size].decode("utf-8"))
    return header.get("__metadata__", {}) or {}
