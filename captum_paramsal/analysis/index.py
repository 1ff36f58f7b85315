"""Nearest neighbours in saliency space (Levin et al., §4): samples whose standardized profiles
point the same way (cosine similarity) tend to be semantically similar, e.g. share the same
true / predicted class pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import labelled_batches
from ..layout import SaliencyLayout
from .dataset_profiles import device_of, predict

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency

BACKENDS = ("torch", "faiss")
#: The torch backend's similarity block (queries x set) holds at most this many entries
#: (64 MiB in float32), whatever the number of queries.
CHUNK_ELEMENTS = 2**24

IndexLike = Union[Tensor, Sequence[int], Sequence[bool]]


class SaliencyIndex:
    r"""Exact cosine nearest-neighbour search over the saliency profiles of a data set.

    Holds ``N`` profiles ``(N, F)`` (the paper: standardized profiles, one per sample of the
    validation set) and answers "which samples' profiles are most similar to this one?" by
    cosine similarity, exactly (a brute-force scan, no approximation). Rows are L2-normalized
    once; queries are normalized and compared with the whole set by one matrix product per
    chunk of queries, sized so that a chunk's similarity block has at most ``2**24`` entries
    (or ``chunk_size`` queries), and ``torch.topk`` keeps the ``m`` best of each.

    A profile of norm zero (every unit exactly at its reference mean) has cosine similarity
    0 with everything. Among exactly tied similarities the order of the returned neighbours
    is unspecified.

    Args:
        profiles: ``(N, F)`` tensor (or array-like) of finite values, e.g. ``ps.attribute(...)``
            with ``ps.stats`` set. Kept on its device; float64 stays float64, integer and
            half-precision inputs become float32.
        layout: the :class:`SaliencyLayout` of the columns (``ps.layout``), kept for reference
            (``index.layout.unit_of(column)``); its width must be ``F``.
        backend: ``"torch"`` (default) or ``"faiss"``: a ``faiss.IndexFlatIP`` over the
            normalized rows in float32 (exact inner product, which is the cosine), an optional
            extra for large sets on the CPU (``pip install faiss-cpu``); results come back on
            the CPU as float32 similarities. Precision: the torch backend compares float64
            profiles in float64 (what ``ps.attribute`` and :meth:`from_saliency` give for
            standardized profiles); faiss always in float32, where the standardized
            profiles of confidently right samples (all close to ``-mean / std``) differ by
            less than float32 resolves, so their neighbours can differ from the exact ones.
            :attr:`precision` says which.
        chunk_size: queries per matrix product for the torch backend; default: as many as keep
            the block under ``2**24`` entries.
        labels, predictions: optional ``(N,)`` integer tensors of each sample's true and
            predicted class, stored for :func:`semantic_agreement` (``from_saliency`` fills
            them).

    Attributes:
        profiles (Tensor): the ``(N, F)`` profiles as given (detached).
        layout (SaliencyLayout or None): the columns.
        labels, predictions (Tensor or None): per sample, on the CPU.

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> from captum_paramsal.analysis import SaliencyIndex, semantic_agreement
        >>> ps = ParameterSaliency(model)
        >>> ps.stats = ps.fit_stats(val_loader)
        >>> index = SaliencyIndex.from_saliency(ps, val_loader)   # standardized profiles
        >>> sims, idx = index.neighbours(17, m=5)                  # sample 17's 5 nearest others
        >>> sims, idx = index.search(ps.attribute(images, target=labels), m=5)   # new samples
        >>> wrong = index.labels != index.predictions
        >>> print(semantic_agreement(index, m=5, among=wrong).to_markdown())
        >>> # the same search through faiss, for large sets (pip install faiss-cpu)
        >>> big = SaliencyIndex(index.profiles, layout=ps.layout, backend="faiss")
    """

    def __init__(
        self,
        profiles: Any,
        layout: Optional[SaliencyLayout] = None,
        backend: str = "torch",
        chunk_size: Optional[int] = None,
        labels: Optional[Any] = None,
        predictions: Optional[Any] = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        profiles = _as_float_matrix(profiles, "profiles")
        if profiles.shape[0] == 0 or profiles.shape[1] == 0:
            raise ValueError(f"profiles must hold at least one sample and one unit, got shape {tuple(profiles.shape)}")
        _check_finite(profiles, "profiles")
        if layout is not None:
            if not isinstance(layout, SaliencyLayout):
                raise TypeError(f"layout must be a SaliencyLayout or None, got {type(layout).__name__}")
            if layout.num_columns != profiles.shape[1]:
                raise ValueError(
                    f"layout has {layout.num_columns} columns but profiles have {profiles.shape[1]} units"
                )
        self.profiles: Tensor = profiles
        self.layout = layout
        self.backend = backend
        self.chunk_size = chunk_size
        self.labels = _optional_per_sample(labels, len(self), "labels")
        self.predictions = _optional_per_sample(predictions, len(self), "predictions")
        if backend == "torch":
            self._unit: Optional[Tensor] = F.normalize(profiles, dim=1)
            self._faiss = None
        else:
            faiss = _import_faiss()
            self._unit = None  # faiss keeps its own float32 copy; no second one here
            self._faiss = faiss.IndexFlatIP(profiles.shape[1])
            self._faiss.add(_faiss_rows(profiles))

    @classmethod
    def from_saliency(
        cls,
        ps: ParameterSaliency,
        data: Iterable,
        progress: bool = True,
        max_samples: Optional[int] = None,
        standardize: bool = True,
        internal_batch_size: Optional[int] = None,
        backend: str = "torch",
    ) -> SaliencyIndex:
        r"""Index the saliency profiles of a whole data set.

        For each batch ``(inputs, labels)`` of ``data`` the profile is
        ``ps.attribute(inputs, target=labels)``: the loss at the TRUE label, as in the paper,
        standardized with ``ps.stats`` in float64 (so the index compares in float64). The
        labels are stored as :attr:`labels`, and the model's predictions (argmax of its
        output, one extra forward pass without gradients per batch) as :attr:`predictions`
        when the output is ``(batch, classes)`` (else None).
        Profiles are moved to the CPU as they arrive; build a GPU index with
        ``SaliencyIndex(index.profiles.cuda(), ...)``.

        Args:
            ps: a :class:`~captum_paramsal.ParameterSaliency`.
            data: an iterable of ``(inputs, labels)`` batches (a ``DataLoader`` included).
            progress: show a tqdm progress bar.
            max_samples: stop after this many samples.
            standardize: index standardized profiles (default; needs ``ps.stats``, the paper's
                choice); False indexes raw profiles.
            internal_batch_size: as in :meth:`ParameterSaliency.attribute`, bounds memory.
            backend: as in :class:`SaliencyIndex`.

        Returns:
            a :class:`SaliencyIndex` with ``layout=ps.layout``, sample ``i`` being the
            ``i``-th sample of ``data``.

        Raises:
            ValueError: ``standardize=True`` while ``ps.stats`` is None, a malformed batch,
                or no samples.

        Examples::

            >>> ps.stats = ps.fit_stats(val_loader)
            >>> index = SaliencyIndex.from_saliency(ps, val_loader, max_samples=5000)
            >>> len(index), index.labels.shape
            (5000, torch.Size([5000]))
        """
        stats = ps.stats
        if standardize and stats is None:
            raise ValueError(
                "SaliencyIndex.from_saliency indexes standardized profiles (as the paper), but ps.stats is "
                "None: set ps.stats = ps.fit_stats(reference_data) first, or pass standardize=False to "
                "index raw profiles"
            )
        if backend not in BACKENDS:  # fail before the expensive pass, not after it
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        rows, labels, predictions = [], [], []
        batches = labelled_batches(
            data, device=device_of(ps), max_samples=max_samples, progress=progress, desc="saliency index"
        )
        for inputs, targets in batches:
            (raw,) = ps.attribute(inputs, target=targets, internal_batch_size=internal_batch_size, standardize=False)
            raw = raw.detach()
            rows.append((stats.standardize(raw) if standardize else raw).cpu())  # z: float64
            labels.append(targets.cpu())
            if predictions is not None:
                predicted = predict(ps.model, inputs, require=False)
                if predicted is None:  # not a classifier's (batch, classes) output: no predictions
                    predictions = None
                else:
                    predictions.append(predicted.cpu())
        if not rows:
            raise ValueError("SaliencyIndex.from_saliency saw no samples: data is empty")
        return cls(
            torch.cat(rows),
            layout=ps.layout,
            backend=backend,
            labels=torch.cat(labels),
            predictions=None if predictions is None else torch.cat(predictions),
        )

    @property
    def precision(self) -> torch.dtype:
        """The dtype in which similarities are computed: the profiles' (float64 or float32)
        for the torch backend, float32 for faiss."""
        return self._unit.dtype if self._unit is not None else torch.float32

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.profiles.shape[0]

    @property
    def num_units(self) -> int:
        """``F``, the width of a profile.

        Examples::

            >>> index.num_units == ps.layout.num_columns
            True
        """
        return self.profiles.shape[1]

    def search(self, queries: Any, m: int, exclude: Optional[Any] = None) -> Tuple[Tensor, Tensor]:
        r"""The ``m`` samples of the index most cosine-similar to each query.

        Args:
            queries: ``(Q, F)`` profiles (or one ``(F,)`` profile), in the same space as the
                index (standardized if the index is).
            m: neighbours per query, ``1 <= m <= N - E`` where ``E`` is the number of
                exclusions per query.
            exclude: samples of the index that must not be returned: ``(Q,)`` integers, one per
                query (e.g. the query's own index), or ``(Q, E)`` for several; negative entries
                exclude nothing (padding for queries with fewer exclusions).

        Returns:
            ``(similarities, indices)``, each ``(Q, m)`` (``(m,)`` for one ``(F,)`` query):
            cosine similarities in descending order and the indices of those samples in the
            index.

        Raises:
            ValueError: queries that are not ``(Q, F)``, contain NaN/inf, an ``m`` out of
                range, or malformed ``exclude``.

        Examples::

            >>> sims, idx = index.search(ps.attribute(images, target=labels), m=5)
            >>> sims.shape, idx.shape
            (torch.Size([8, 5]), torch.Size([8, 5]))
        """
        if not isinstance(queries, Tensor):
            try:
                queries = torch.as_tensor(queries)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"queries must be a (queries, units) tensor: {error}") from None
        single = queries.dim() == 1
        queries = _as_float_matrix(queries[None] if single else queries, "queries")
        if queries.shape[1] != self.num_units:
            raise ValueError(
                f"queries have width {queries.shape[1]}, but the index's profiles have {self.num_units} units"
            )
        _check_finite(queries, "queries")
        exclude = self._check_exclude(exclude, queries.shape[0])
        excluded = 0 if exclude is None else exclude.shape[1]
        self._check_m(m, len(self) - excluded, "" if exclude is None else f" minus {excluded} excluded per query")
        if self.backend == "faiss":
            similarities, indices = self._search_faiss(queries, m, exclude)
        else:
            similarities, indices = self._search_torch(queries, m, exclude)
        return (similarities[0], indices[0]) if single else (similarities, indices)

    def neighbours(self, i: int, m: int) -> Tuple[Tensor, Tensor]:
        """Sample ``i``'s ``m`` nearest other samples: ``(similarities (m,), indices (m,))``,
        most similar first; ``1 <= m < N``. The sample itself is excluded by index (an exact
        duplicate of it elsewhere in the index is still a neighbour).

        Examples::

            >>> sims, idx = index.neighbours(17, m=5)
            >>> index.labels[idx]                 # the classes of sample 17's neighbours
        """
        if not isinstance(i, int) or isinstance(i, bool) or not -len(self) <= i < len(self):
            raise IndexError(f"sample {i!r} is out of range for an index of {len(self)} samples")
        i = i % len(self)
        self._check_m(m, len(self) - 1, " minus the sample itself")
        return self.search(self.profiles[i], m, exclude=torch.tensor([i]))

    def neighbours_of_all(self, m: int) -> Tuple[Tensor, Tensor]:
        """Every sample's ``m`` nearest other samples: ``(similarities (N, m), indices (N, m))``,
        row ``i`` for sample ``i``, itself excluded; ``1 <= m < N``.

        Examples::

            >>> sims, idx = index.neighbours_of_all(5)
            >>> idx.shape
            torch.Size([5000, 5])
        """
        self._check_m(m, len(self) - 1, " minus the sample itself")
        return self.search(self.profiles, m, exclude=torch.arange(len(self)))

    def subset(self, selection: IndexLike) -> SaliencyIndex:
        """A new index over some samples only (a boolean mask ``(N,)`` or integer indices), same
        backend; its sample ``j`` is the ``j``-th selected one. Labels and predictions follow.

        Examples::

            >>> wrong = index.subset(index.labels != index.predictions)   # misclassified only
            >>> first = index.subset(range(100))
        """
        rows = _selection_indices(selection, len(self), "selection")
        if rows.numel() == 0:
            raise ValueError("selection is empty: an index needs at least one sample")
        return SaliencyIndex(
            self.profiles[rows.to(self.profiles.device)],
            layout=self.layout,
            backend=self.backend,
            chunk_size=self.chunk_size,
            labels=None if self.labels is None else self.labels[rows],
            predictions=None if self.predictions is None else self.predictions[rows],
        )

    def __repr__(self) -> str:
        return (
            f"SaliencyIndex({len(self)} samples, {self.num_units} units, backend={self.backend!r}, "
            f"dtype={self.profiles.dtype}, device={self.profiles.device})"
        )

    # -- internals -------------------------------------------------------------------------
    def _check_m(self, m: Any, largest: int, why: str) -> None:
        if not isinstance(m, int) or isinstance(m, bool):
            raise ValueError(f"m must be an int, got {type(m).__name__}")
        if not 1 <= m <= largest:
            raise ValueError(
                f"m must be between 1 and {largest} (the index's {len(self)} samples{why}), got {m}"
            )

    def _check_exclude(self, exclude: Any, num_queries: int) -> Optional[Tensor]:
        if exclude is None:
            return None
        try:
            exclude = torch.as_tensor(exclude)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"exclude must be integer sample indices: {error}") from None
        if exclude.is_floating_point() or exclude.is_complex() or exclude.dtype == torch.bool:
            raise ValueError(f"exclude must hold integer sample indices, got dtype {exclude.dtype}")
        if exclude.dim() == 1:
            exclude = exclude[:, None]
        if exclude.dim() != 2 or exclude.shape[0] != num_queries:
            raise ValueError(
                f"exclude must be ({num_queries},) or ({num_queries}, E), one row per query, "
                f"got shape {tuple(exclude.shape)}"
            )
        if exclude.numel() and int(exclude.max()) >= len(self):
            raise ValueError(f"exclude holds index {int(exclude.max())}, but the index has {len(self)} samples")
        return exclude.long()

    def _search_torch(self, queries: Tensor, m: int, exclude: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        unit = self._unit
        queries = queries.to(device=unit.device, dtype=unit.dtype)
        if exclude is not None:
            exclude = exclude.to(unit.device)
        step = self.chunk_size or max(1, CHUNK_ELEMENTS // len(self))
        values, indices = [], []
        for start in range(0, queries.shape[0], step):
            stop = min(start + step, queries.shape[0])
            # normalizing per chunk keeps the extra memory at one chunk of queries
            block = F.normalize(queries[start:stop], dim=1) @ unit.T
            if exclude is not None:
                rows, slots = (exclude[start:stop] >= 0).nonzero(as_tuple=True)
                block[rows, exclude[start:stop][rows, slots]] = float("-inf")
            top = torch.topk(block, m, dim=1)
            values.append(top.values)
            indices.append(top.indices)
        return torch.cat(values), torch.cat(indices)

    def _search_faiss(self, queries: Tensor, m: int, exclude: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        import numpy as np

        excluded = 0 if exclude is None else exclude.shape[1]
        # ask for E more than needed, then drop the excluded ones: at least m remain per query
        similarities, indices = self._faiss.search(_faiss_rows(queries), m + excluded)
        if exclude is not None:
            ex = exclude.cpu().numpy()
            hit = ((indices[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0)).any(-1)
            keep = np.argsort(hit, axis=1, kind="stable")[:, :m]  # not-excluded first, order kept
            similarities = np.take_along_axis(similarities, keep, axis=1)
            indices = np.take_along_axis(indices, keep, axis=1)
        else:
            similarities, indices = similarities[:, :m], indices[:, :m]
        return torch.from_numpy(np.ascontiguousarray(similarities)), torch.from_numpy(
            np.ascontiguousarray(indices)
        ).long()


@dataclass(frozen=True)
class SemanticAgreement:
    r"""How often saliency-space neighbours share a sample's class, against chance.

    Built by :func:`semantic_agreement`. For each sample, among its ``m`` nearest neighbours
    (itself excluded): the fraction with its true class and the fraction with its
    (true class, predicted class) pair, averaged over samples. The chance levels are exact:
    for each sample, the fraction of the other samples (in the searched set) sharing its class
    (resp. pair), averaged over samples; this is what ``m`` neighbours drawn at random would
    score on average.

    Attributes:
        same_class, same_class_chance: neighbours sharing the true class; chance level.
        same_pair, same_pair_chance: neighbours sharing the (true, predicted) pair; chance level.
        m: neighbours per sample.
        num_samples: samples averaged over (those in ``among`` when given).

    Examples::

        >>> result = semantic_agreement(index, m=5, among=index.labels != index.predictions)
        >>> result.same_pair, result.same_pair_chance
        (0.41, 0.013)
        >>> print(result.to_markdown())
    """

    same_class: float
    same_class_chance: float
    same_pair: float
    same_pair_chance: float
    m: int
    num_samples: int

    def to_markdown(self) -> str:
        """A table: measure, agreement among the ``m`` neighbours, chance level, their ratio.

        Examples::

            >>> print(semantic_agreement(index, m=5).to_markdown())
        """

        def ratio(value: float, chance: float) -> str:
            return f"{value / chance:.1f}×" if chance > 0 else "—"

        return "\n".join([
            f"| neighbours share the sample's | among its {self.m} nearest neighbours "
            f"({self.num_samples} samples) | chance | ratio |",
            "|---|---:|---:|---:|",
            f"| true class | {self.same_class:.1%} | {self.same_class_chance:.1%} | "
            f"{ratio(self.same_class, self.same_class_chance)} |",
            f"| (true, predicted) class pair | {self.same_pair:.1%} | {self.same_pair_chance:.1%} | "
            f"{ratio(self.same_pair, self.same_pair_chance)} |",
        ])


def semantic_agreement(
    index: SaliencyIndex,
    labels: Optional[Any] = None,
    predictions: Optional[Any] = None,
    m: int = 5,
    among: Optional[Any] = None,
) -> SemanticAgreement:
    r"""Do samples with similar saliency profiles share their class (the paper's §4 claim)?

    For every sample, its ``m`` nearest neighbours by cosine similarity (itself excluded):
    the fraction sharing its true class and the fraction sharing its (true, predicted) pair,
    averaged over samples, with the exact chance level of each (see :class:`SemanticAgreement`).
    With exactly tied similarities, which neighbour is taken is unspecified.

    Args:
        index: a :class:`SaliencyIndex` (usually of standardized profiles).
        labels: ``(N,)`` true classes; default ``index.labels``.
        predictions: ``(N,)`` predicted classes; default ``index.predictions``.
        m: neighbours per sample, ``1 <= m < n`` (``n`` the number of samples searched).
        among: optional ``(N,)`` boolean mask (e.g. ``labels != predictions``, the
            misclassified samples): only those samples are evaluated, their neighbours are
            searched among them only, and chance levels count them only.

    Returns:
        :class:`SemanticAgreement`.

    Raises:
        ValueError: missing or malformed labels / predictions / mask, or ``m`` out of range.

    Examples::

        >>> index = SaliencyIndex.from_saliency(ps, val_loader)     # ps.stats set
        >>> print(semantic_agreement(index, m=5).to_markdown())
        >>> wrong = index.labels != index.predictions
        >>> semantic_agreement(index, m=5, among=wrong).same_pair   # misclassified only
    """
    if not isinstance(index, SaliencyIndex):
        raise TypeError(f"index must be a SaliencyIndex, got {type(index).__name__}")
    labels = index.labels if labels is None else labels
    predictions = index.predictions if predictions is None else predictions
    if labels is None or predictions is None:
        missing = "labels" if labels is None else "predictions"
        raise ValueError(f"semantic_agreement needs {missing}: pass them, or build the index with from_saliency")
    labels = _optional_per_sample(labels, len(index), "labels")
    predictions = _optional_per_sample(predictions, len(index), "predictions")
    if among is not None:
        mask = _as_mask(among, len(index))
        searched = index.subset(mask)
        labels, predictions = labels[mask], predictions[mask]
    else:
        searched = index
    n = len(searched)
    if n < 2:
        raise ValueError(f"semantic_agreement needs at least 2 samples to search among, got {n}")
    searched._check_m(m, n - 1, " searched, minus the sample itself")
    _, neighbours = searched.neighbours_of_all(m)
    neighbours = neighbours.cpu()
    # one integer id per (true, predicted) pair, so pairs compare like classes
    _, pair = torch.unique(torch.stack([labels, predictions], dim=1), dim=0, return_inverse=True)
    result = {}
    for name, group in (("class", labels), ("pair", pair)):
        shared = (group[neighbours] == group[:, None]).double().mean(1)
        _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
        chance = (counts[inverse] - 1).double() / (n - 1)  # the other samples of the same group
        result[f"same_{name}"] = float(shared.mean())
        result[f"same_{name}_chance"] = float(chance.mean())
    return SemanticAgreement(m=m, num_samples=n, **result)


# -- validation helpers --------------------------------------------------------------------------


def _as_float_matrix(values: Any, what: str) -> Tensor:
    if not isinstance(values, Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{what} must be a (samples, units) tensor: {error}") from None
    if values.dim() != 2:
        raise ValueError(f"{what} must be 2-D (samples, units), got shape {tuple(values.shape)}")
    if values.is_complex():
        raise ValueError(f"{what} must be real, got dtype {values.dtype}")
    values = values.detach()
    # float64 stays exact; anything narrower or integer is compared in float32 (half matmuls on
    # the CPU are slow and lose the ordering of close neighbours)
    if values.dtype != torch.float64:
        values = values.float()
    return values


def _check_finite(values: Tensor, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        kind = "NaN" if bool(torch.isnan(values[row]).any()) else "inf"
        raise ValueError(f"{what} contain {kind} (first in row {row}); cosine similarity needs finite values")


def _optional_per_sample(values: Any, n: int, what: str) -> Optional[Tensor]:
    if values is None:
        return None
    try:
        values = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{what} must be integer classes, one per sample: {error}") from None
    if values.dim() != 1 or values.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},), one per sample of the index, got {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{what} must be integer classes, got dtype {values.dtype}")
    return values.detach().cpu().long()


def _as_mask(among: Any, n: int) -> Tensor:
    mask = torch.as_tensor(among).detach().cpu()
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != n:
        raise ValueError(
            f"among must be a boolean mask of shape ({n},), got dtype {mask.dtype} and shape {tuple(mask.shape)}"
        )
    return mask


def _selection_indices(selection: Any, n: int, what: str) -> Tensor:
    try:
        rows = torch.as_tensor(selection).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{what} must be a boolean mask or integer indices: {error}") from None
    if rows.dtype == torch.bool:
        if rows.dim() != 1 or rows.shape[0] != n:
            raise ValueError(f"a boolean {what} must have shape ({n},), got {tuple(rows.shape)}")
        return rows.nonzero().flatten()
    if rows.is_floating_point() or rows.is_complex() or rows.dim() != 1:
        raise ValueError(f"{what} must be a 1-D boolean mask or integer indices, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < -n or int(rows.max()) >= n):
        raise ValueError(f"{what} holds indices outside 0..{n - 1}")
    return rows.long() % n


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "SaliencyIndex(backend='faiss') needs faiss: pip install faiss-cpu "
            "(or pip install 'captum-paramsal[faiss]'); backend='torch' needs nothing extra"
        ) from None
    return faiss


def _faiss_rows(values: Tensor):
    """L2-normalized float32 rows, C-contiguous, as faiss wants them: inner product == cosine."""
    return F.normalize(values.detach().to(device="cpu", dtype=torch.float32), dim=1).contiguous().numpy()
