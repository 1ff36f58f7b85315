"""Reference statistics of saliency profiles: streaming, mergeable, saved without pickle.

Per unit ``u`` over a reference set (the paper: the whole validation set, with true
labels): ``mean[u]`` and the sample standard deviation ``std[u]`` (divide by N - 1),
accumulated in float64 by Welford/Chan updates, so batches, resumed runs and processes
combine exactly. Standardized saliency is ``z = (s - mean) / std'`` with ``std' = std``
where ``std > 1e-12`` and 1 elsewhere (dead units get z = 0, not inf).

Statistics know what they were fitted for: the layout, reduction and loss (the
*fingerprint*), and the values of the weights (the *weights digest*, :func:`weights_digest`);
a file also carries a checksum of its tensors (docs/METHOD.md, "Standardization").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

from ._utils import atomic_write, outside_stacklevel
from .layout import SaliencyLayout

FORMAT_NAME = "captum-paramsal/saliency-stats"
#: the version :meth:`SaliencyStats.save` writes: 2 adds the tensors' checksum and the weights digest
FORMAT_VERSION = "2"
#: the versions :meth:`SaliencyStats.load` reads (1: no checksum, no weights digest)
READABLE_VERSIONS = ("1", "2")
#: Standard deviations at or below this are treated as 1: the unit does not vary.
STD_FLOOR = 1e-12
#: the tensors of a statistics file, and the metadata fields every file has
TENSOR_NAMES = ("count", "mean", "m2")
METADATA_FIELDS = ("fingerprint", "reduction", "loss", "layout")
#: more samples than this cannot be counted exactly in float64 (all_reduce): not a real count
MAX_COUNT = 2**53
#: elements per piece when hashing a parameter (bounds the float64 copy: 32 MiB)
_DIGEST_CHUNK = 1 << 22
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _is_sha256(text: str) -> bool:
    return _SHA256_HEX.fullmatch(text) is not None


def layout_fingerprint(layout: SaliencyLayout, reduction: str, loss: str) -> str:
    """A short hash of what a profile's columns mean: names, shapes, units, reduction, loss."""
    description = {
        "params": layout.description(),
        "reduction": reduction,
        "loss": loss,
    }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_digest(parameters: Iterable[Tuple[str, Tensor]]) -> str:
    """SHA-256 (hex) of parameters' values: what statistics record as the weights they were fitted on.

    ``parameters``: ``(name, tensor)`` pairs in the order of the identity layout (the names
    without what wraps the model). Each contributes its name, its shape and its values in
    logical (row-major) order, converted to float64 (complex128 for complex parameters),
    little-endian: the digest does not depend on the device, the memory format or an exact
    change of dtype (float32 to float64), and changes with any value.
    """
    h = hashlib.sha256(b"captum-paramsal/weights-digest 1\n")
    for name, tensor in parameters:
        tensor = tensor.detach()
        h.update(json.dumps([name, list(tensor.shape)]).encode() + b"\n")
        dtype = torch.complex128 if tensor.is_complex() else torch.float64
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _DIGEST_CHUNK):
            piece = flat[start : start + _DIGEST_CHUNK].to(device="cpu", dtype=dtype).contiguous().numpy()
            h.update(piece.astype(piece.dtype.newbyteorder("<"), copy=False).data)
    return h.hexdigest()


def _tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes as a safetensors file stores them (little-endian)."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


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
        weights_digest: the :func:`weights_digest` of the parameters the statistics were
            fitted on (set by :meth:`ParameterSaliency.fit_stats`), or None where unknown (a
            file of format 1, statistics built by hand without ``weights_digest=``).
            ``ParameterSaliency`` refuses statistics of other weights unless
            ``check_weights=False``; :meth:`for_weights` re-labels them on purpose.

    Examples::

        >>> stats = ps.fit_stats(val_loader)              # one streaming pass
        >>> stats.save("resnet50-val.safetensors")
        >>> stats = SaliencyStats.load("resnet50-val.safetensors")
        >>> ps = ParameterSaliency(model, stats=stats)
        >>> z = ps.attribute(images, target=labels)      # standardized saliency
    """

    def __init__(
        self,
        layout: SaliencyLayout,
        reduction: str,
        loss: str,
        moments: Optional[_Moments] = None,
        weights_digest: Optional[str] = None,
    ):
        self.layout = layout
        self.reduction = reduction
        self.loss = loss
        self.fingerprint = layout_fingerprint(layout, reduction, loss)
        if weights_digest is not None and not (isinstance(weights_digest, str) and _is_sha256(weights_digest)):
            raise ValueError(f"weights_digest must be 64 lowercase hex digits (a SHA-256), got {weights_digest!r}")
        self.weights_digest: Optional[str] = weights_digest
        zeros = torch.zeros(layout.num_columns, dtype=torch.float64)
        self._moments = moments if moments is not None else _Moments(0, zeros, zeros.clone())

    @classmethod
    def empty(
        cls,
        layout: SaliencyLayout,
        reduction: str = "mean_abs",
        loss: str = "cross_entropy",
        weights_digest: Optional[str] = None,
    ) -> SaliencyStats:
        """No samples yet; fill with :meth:`partial_fit`. ``weights_digest``: the weights the
        profiles will come from (``ps.weights_digest()``), so that they can be checked later."""
        return cls(layout, reduction, loss, weights_digest=weights_digest)

    def for_weights(self, weights: Any) -> SaliencyStats:
        """These statistics (a copy) labelled as fitted on other weights, on purpose.

        ``weights``: a ``ParameterSaliency`` (its current :meth:`~ParameterSaliency.weights_digest`;
        its layout, reduction and loss must match) or a digest. For a fine-tuned model meant to be
        standardized by its base model's statistics, to save such statistics with the label, or
        to give a format-1 file a digest: ``stats.for_weights(ps).save(path)``.
        """
        saliency_like = callable(getattr(weights, "weights_digest", None)) and hasattr(weights, "fingerprint")
        if isinstance(weights, str):
            digest = weights
        elif saliency_like:
            self.check_compatible(weights.fingerprint, what=f"the profiles of {type(weights).__name__}")
            digest = weights.weights_digest()
        else:
            raise TypeError(f"for_weights takes a ParameterSaliency or a weights digest, got {type(weights).__name__}")
        return SaliencyStats(self.layout, self.reduction, self.loss, self._moments, weights_digest=digest)

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
        """Statistics of both data sets together (a new object).

        Both must have the same fingerprint and, where both know it, the same weights digest:
        profiles of different weights do not make one distribution. The result's digest is
        theirs, or None (unknown) where one of them has none.
        """
        if not isinstance(other, SaliencyStats):
            raise TypeError(f"merge takes SaliencyStats, got {type(other).__name__}")
        self.check_compatible(other.fingerprint, what="statistics to merge")
        digest = _merged_digest([self.weights_digest, other.weights_digest], "statistics to merge")
        return SaliencyStats(self.layout, self.reduction, self.loss, self._moments.merge(other._moments), digest)

    def all_reduce(self, group: Optional[Any] = None) -> SaliencyStats:
        """Across a ``torch.distributed`` group: every rank gets the statistics of all ranks.

        Each rank's moments are gathered and merged in rank order, so every rank ends with
        bit-identical statistics. Returns a new object. Ranks whose statistics were fitted on
        different weights (different weights digests) are refused, on every rank alike.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        m = self._moments
        # the weights digest travels as its 32 bytes (-1 for none), after the count
        if self.weights_digest is None:
            digest = torch.full((32,), -1.0, dtype=torch.float64)
        else:
            digest = torch.tensor(list(bytes.fromhex(self.weights_digest)), dtype=torch.float64)
        local = torch.cat([torch.tensor([float(m.count)], dtype=torch.float64), digest, m.mean, m.m2]).to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        merged = _Moments(0, torch.zeros_like(m.mean), torch.zeros_like(m.m2))
        columns = m.mean.shape[0]
        digests = []
        for part in gathered:
            part = part.cpu()
            raw = part[1:33]
            digests.append(None if bool((raw < 0).any()) else bytes(int(v) for v in raw.tolist()).hex())
            moments = _Moments(int(part[0].item()), part[33 : 33 + columns], part[33 + columns :])
            merged = merged.merge(moments)
        digest = _merged_digest(digests, "the ranks' statistics")
        return SaliencyStats(self.layout, self.reduction, self.loss, merged, digest)

    # -- standardization ----------------------------------------------------------------
    def check_compatible(self, fingerprint: str, what: str = "these profiles") -> None:
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"{what} have layout fingerprint {fingerprint}, but the statistics were computed for "
                f"{self.fingerprint} ({len(self.layout)} parameters, {self.layout.num_columns} units, "
                f"reduction={self.reduction!r}, loss={self.loss!r}): statistics from another model, "
                "parameter selection, reduction or loss cannot standardize them"
            )

    def check_weights_digest(self, digest: str, what: str = "this model") -> None:
        """Refuse (ValueError) weights other than those the statistics were fitted on; warn
        where the statistics do not know theirs (a format-1 file, built by hand)."""
        if self.weights_digest is None:
            warnings.warn(
                "these statistics do not record which weights they were fitted on (a statistics file of format 1, "
                "from an older captum-paramsal, or statistics built without weights_digest=): cannot check that "
                f"they belong to {what}'s weights. Re-label them on purpose with stats.for_weights(ps) (and save), "
                "or pass check_weights=False",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
            return
        if digest != self.weights_digest:
            raise ValueError(
                f"these statistics were fitted on other weights than {what}'s (weights digest "
                f"{self.weights_digest[:16]}..., {what}: {digest[:16]}...): same layout, other parameter values "
                "(another checkpoint, a freshly initialised or a fine-tuned model), so the z-scores would be "
                "meaningless. Fit statistics for these weights (ps.fit_stats), or, to standardize a fine-tuned "
                "model with its base model's statistics on purpose, pass check_weights=False to ParameterSaliency "
                "(or use stats.for_weights(ps))"
            )

    @property
    def scale(self) -> Tensor:
        """``std'``: the standard deviation where it exceeds 1e-12, else 1."""
        if self.count < 2:
            raise ValueError(f"standardizing needs statistics over at least 2 samples, these have {self.count}")
        std = self.std
        return torch.where(std > STD_FLOOR, std, torch.ones_like(std))

    def standardize(self, saliency: Tensor) -> Tensor:
        """``(s - mean) / std'`` in float64 (the statistics' precision) on the device of ``saliency``.

        Float64 whatever ``saliency``'s dtype: a confidently right sample has tiny gradients, so
        ``s - mean`` is nearly ``-mean`` for all such samples, and what tells them apart (their
        nearest neighbours) would not survive the subtraction in float32."""
        if saliency.shape[-1] != self.layout.num_columns:
            raise ValueError(
                f"profiles have {saliency.shape[-1]} columns, the statistics {self.layout.num_columns}"
            )
        scale = self.scale.to(device=saliency.device)
        mean = self._moments.mean.to(device=saliency.device)
        return (saliency.to(torch.float64) - mean) / scale

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
            "tensors_sha256": json.dumps({name: _tensor_sha256(tensors[name]) for name in TENSOR_NAMES}),
        }
        if self.weights_digest is not None:
            metadata["weights_sha256"] = self.weights_digest
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
        version = metadata.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path} has statistics format version {version!r}; "
                f"this version of captum-paramsal reads {', '.join(repr(v) for v in READABLE_VERSIONS)}"
            )
        missing = [name for name in METADATA_FIELDS + (("tensors_sha256",) if version != "1" else ())
                   if name not in metadata]
        if missing:
            raise ValueError(
                f"{path}: the statistics metadata has no {', '.join(repr(m) for m in missing)} field "
                "(an incomplete or edited statistics file)"
            )
        _check_tensors(path, tensors)
        if version != "1":
            _check_checksums(path, tensors, metadata["tensors_sha256"])
        digest = metadata.get("weights_sha256") if version != "1" else None
        if digest is not None and not _is_sha256(digest):
            raise ValueError(
                f"{path}: the metadata field 'weights_sha256' is not a SHA-256 (64 hex digits): {digest!r}"
            )
        try:
            layout = SaliencyLayout(json.loads(metadata["layout"]))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ValueError(f"{path}: the metadata field 'layout' is not a saliency layout: {error!r}") from None
        mean, m2, count = tensors["mean"], tensors["m2"], int(tensors["count"])
        if mean.shape != (layout.num_columns,) or m2.shape != mean.shape:
            raise ValueError(
                f"{path}: the tensors 'mean' {tuple(mean.shape)} and 'm2' {tuple(m2.shape)} do not match the "
                f"layout's {layout.num_columns} units"
            )
        _check_values(path, count, mean, m2)
        stats = cls(layout, metadata["reduction"], metadata["loss"], _Moments(count, mean, m2), digest)
        if stats.fingerprint != metadata["fingerprint"]:
            raise ValueError(
                f"{path}: the metadata field 'fingerprint' does not match its layout, reduction and loss (edited file?)"
            )
        return stats

    def __repr__(self) -> str:
        return (
            f"SaliencyStats(count={self.count}, units={self.layout.num_columns}, "
            f"reduction={self.reduction!r}, loss={self.loss!r}, fingerprint={self.fingerprint}, "
            f"weights={'unknown' if self.weights_digest is None else self.weights_digest[:16]})"
        )


def _merged_digest(digests: Iterable[Optional[str]], what: str) -> Optional[str]:
    """The weights digest of statistics merged from parts: theirs, None if one has none; parts
    fitted on different weights are refused."""
    digests = list(digests)
    known = sorted({d for d in digests if d is not None})
    if len(known) > 1:
        raise ValueError(
            f"{what} were fitted on different weights (weights digests {', '.join(d[:16] + '...' for d in known)}): "
            "profiles of different parameter values do not make one reference distribution"
        )
    return known[0] if known and None not in digests else None


def _check_tensors(path: str, tensors: Dict[str, Tensor]) -> None:
    """The file holds exactly ``count`` (an int64 scalar), ``mean`` and ``m2`` (float64 vectors)."""
    extra = sorted(set(tensors) - set(TENSOR_NAMES))
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra} in a statistics file (it holds count, mean and m2)")
    for name in TENSOR_NAMES:
        if name not in tensors:
            raise ValueError(f"{path}: the statistics file has no tensor {name!r}")
    count = tensors["count"]
    if count.dtype != torch.int64 or count.dim() != 0:
        raise ValueError(
            f"{path}: the tensor 'count' must be an int64 scalar (a number of samples), got {count.dtype} of shape "
            f"{tuple(count.shape)}"
        )
    for name in ("mean", "m2"):
        if tensors[name].dtype != torch.float64 or tensors[name].dim() != 1:
            raise ValueError(
                f"{path}: the tensor {name!r} must be a float64 vector (one value per unit), got "
                f"{tensors[name].dtype} of shape {tuple(tensors[name].shape)}"
            )


def _check_checksums(path: str, tensors: Dict[str, Tensor], field: str) -> None:
    try:
        stored = json.loads(field)
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict) or sorted(stored) != sorted(TENSOR_NAMES):
        raise ValueError(f"{path}: the metadata field 'tensors_sha256' is not a checksum of count, mean and m2")
    for name in TENSOR_NAMES:
        if _tensor_sha256(tensors[name]) != stored[name]:
            raise ValueError(
                f"{path}: the tensor {name!r} does not match its checksum (metadata 'tensors_sha256'): the file is "
                "corrupted or was edited"
            )


def _check_values(path: str, count: int, mean: Tensor, m2: Tensor) -> None:
    if not 0 <= count <= MAX_COUNT:
        raise ValueError(f"{path}: the tensor 'count' is {count}, not a number of samples (0 to 2**53)")
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(f"{path}: the tensor 'mean' has non-finite values")
    if not bool(torch.isfinite(m2).all()):
        raise ValueError(f"{path}: the tensor 'm2' has non-finite values")
    if bool((m2 < 0).any()):
        raise ValueError(f"{path}: the tensor 'm2' (sums of squared deviations) has negative values")
    if count == 0 and bool((mean != 0).any() | (m2 != 0).any()):
        raise ValueError(f"{path}: the tensors 'mean' and 'm2' must be 0 with a 'count' of 0")
    if count == 1 and bool((m2 != 0).any()):
        raise ValueError(f"{path}: the tensor 'm2' must be 0 with a 'count' of 1 (one sample does not vary)")


def _read_metadata(payload: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (its JSON header)."""
    if len(payload) < 8:
        raise ValueError("file is shorter than a safetensors header")
    header_size = int.from_bytes(payload[:8], "little")
    if header_size > len(payload) - 8:
        raise ValueError("header runs past the end of the file")
    header = json.loads(payload[8 : 8 + header_size].decode("utf-8"))
    return header.get("__metadata__", {}) or {}
