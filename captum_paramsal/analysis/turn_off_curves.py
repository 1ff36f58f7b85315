"""The paper's pruning test (docs/METHOD.md, "The paper's validation experiments"): does turning
off a misclassified sample's most salient units correct it, far more often than random or least
salient units?

:func:`pruning_curves` evaluates its many interventions (each misclassified sample, each k,
each mode) many at a time: as the rows of one batched forward whose layers empty each row's
turned-off output channels (where every unit is a layer's output channel), else by
``torch.func.vmap`` over edited copies of the touched parameters, and falls back to one
``turn_off`` block per intervention where neither runs the model as its own forward does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .._utils import check_internal_batch_size, evaluation_mode, split_forward_args
from ..interventions import turn_off
from ..layout import SaliencyLayout
from ..per_sample.engine import model_output_tensor
from ..per_sample.fallback import _quiet_batching_fallbacks
from ..units import UnitEntries

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency

MODES = ("salient", "random", "least")

_log = logging.getLogger(__name__)


@dataclass
class PruningResult:
    """Per (k, mode): the fraction of misclassified samples corrected and the mean changes of the
    true class's and the wrongly predicted class's probability.

    Built by :func:`pruning_curves`.

    Attributes:
        records (list): one dict per (sample, k, mode): ``"sample"``, ``"k"``, ``"mode"``,
            ``"corrected"``, ``"delta_true_prob"``, ``"delta_wrong_prob"``.
        ks, modes: the numbers of units and the modes, as run.
        num_misclassified, num_samples (int): misclassified samples; all samples.
        method (str): how the interventions were evaluated: ``"masks"``, ``"vmap"`` or ``"loop"``
            (see :func:`pruning_curves`; ``"auto"`` says which it took).
        table (list): the aggregated rows, one dict per (k, mode): ``"samples"``,
            ``"fraction_corrected"``, ``"mean_delta_true_prob"``, ``"mean_delta_wrong_prob"``.

    Examples::

        >>> result = pruning_curves(model, ps, images, labels, ks=(1, 10, 50))
        >>> result.row(10, "salient")["fraction_corrected"]
        0.62
        >>> print(result.to_markdown())
        >>> result.plot().savefig("pruning.png")
    """

    records: List[Dict[str, Any]]
    ks: Sequence[int]
    modes: Sequence[str]
    num_misclassified: int
    num_samples: int
    method: str = "loop"
    table: List[Dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.table = []
        for k in self.ks:
            for mode in self.modes:
                rows = [r for r in self.records if r["k"] == k and r["mode"] == mode]
                n = len(rows)
                self.table.append({
                    "k": k,
                    "mode": mode,
                    "samples": n,
                    "fraction_corrected": sum(r["corrected"] for r in rows) / n,
                    "mean_delta_true_prob": sum(r["delta_true_prob"] for r in rows) / n,
                    "mean_delta_wrong_prob": sum(r["delta_wrong_prob"] for r in rows) / n,
                })

    def row(self, k: int, mode: str) -> Dict[str, Any]:
        """The :attr:`table` row of ``k`` units turned off in ``mode``; a KeyError if not run.

        Examples::

            >>> result.row(10, "salient")["fraction_corrected"]
            0.62
        """
        for r in self.table:
            if r["k"] == k and r["mode"] == mode:
                return r
        raise KeyError(f"no row for k={k}, mode={mode!r}")

    #: column titles of :meth:`formatted_rows`
    COLUMNS = ("k", "units turned off", "corrected", "mean Δ p(true class)", "mean Δ p(predicted wrong class)")

    def formatted_rows(self) -> List[Tuple[str, ...]]:
        """:attr:`table` as display strings, one tuple per row, in :attr:`COLUMNS` order.

        Examples::

            >>> result.formatted_rows()[0]
            ('1', 'salient', '41.0%', '+0.212', '-0.305')
        """
        return [
            (str(r["k"]), r["mode"], f"{r['fraction_corrected']:.1%}",
             f"{r['mean_delta_true_prob']:+.3f}", f"{r['mean_delta_wrong_prob']:+.3f}")
            for r in self.table
        ]

    def to_markdown(self) -> str:
        """:attr:`table` as a markdown table with the :attr:`COLUMNS` titles.

        Examples::

            >>> print(result.to_markdown())
        """
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|---:|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.formatted_rows()]
        return "\n".join(lines)

    def plot(self, ax: Optional[Any] = None) -> Any:
        """Fraction corrected and mean probability changes against k, one line per mode.

        Args:
            ax: three matplotlib axes to draw into; default: a new ``Figure`` (built without pyplot).

        Returns:
            the matplotlib ``Figure``.

        Examples::

            >>> result.plot().savefig("pruning_curves.png")
        """
        if ax is None:
            from matplotlib.figure import Figure  # no pyplot: a notebook's backend and state stay as they are

            fig = Figure(figsize=(13, 3.6), layout="constrained")
            axes = fig.subplots(1, 3)
        else:
            axes, fig = ax, ax[0].figure
        metrics = [
            ("fraction_corrected", "fraction of misclassified samples corrected"),
            ("mean_delta_true_prob", "mean change of p(true class)"),
            ("mean_delta_wrong_prob", "mean change of p(wrong class)"),
        ]
        for axis, (key, label) in zip(axes, metrics):
            for mode in self.modes:
                axis.plot(self.ks, [self.row(k, mode)[key] for k in self.ks], marker="o", label=f"{mode} units")
            axis.set_xlabel("units turned off (k)")
            axis.set_ylabel(label)
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"Turning off units of {self.num_misclassified} misclassified samples")
        fig.tight_layout()
        return fig


def _probabilities(model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] = model_output_tensor,
                   args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None) -> Tensor:
    with torch.no_grad():
        return torch.softmax(output_fn(model(x, *args, **(kwargs or {}))), dim=-1)


#: samples per forward of the prediction pass over all ``inputs`` without ``internal_batch_size``
#: (a batch of thousands runs several times slower than its pieces: its activations leave the
#: caches; on the trojaned ResNet-20, 2000 images, 2 threads: 1.18 s in 64s, 1.27 in 32s, 1.6 in
#: 128s, 1.8 in 256s, 3.2 in 1000s)
_PREDICT_CHUNK = 64


def _predict(model: nn.Module, inputs: Tensor, output_fn: Callable[[Any], Tensor], args: Tuple[Any, ...],
             kwargs: Dict[str, Any], chunk: int) -> Tensor:
    """:func:`_probabilities` of ``inputs`` in pieces of ``chunk`` samples (per-sample arguments cut alike)."""
    batch = inputs.shape[0]
    if batch <= chunk:
        return _probabilities(model, inputs, output_fn, args, kwargs)
    pieces = []
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        pieces.append(_probabilities(
            model, inputs[part], output_fn, tuple(a[part] if _per_sample(a, batch) else a for a in args),
            {k: v[part] if _per_sample(v, batch) else v for k, v in kwargs.items()},
        ))
    return torch.cat(pieces)


def _rows(values: Any, index: Tensor, batch: int) -> Any:
    """``values[index]`` for a per-sample tensor (first dim ``batch``), anything else as it is."""
    return values[index] if _per_sample(values, batch) else values


def _per_sample(values: Any, batch: int) -> bool:
    return isinstance(values, Tensor) and values.dim() > 0 and values.shape[0] == batch


def _check_ks(ks: Sequence[int], num_units: int) -> List[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    if max(ks) > num_units:
        raise ValueError(f"k={max(ks)} is larger than the number of units ({num_units})")
    return sorted(set(ks))


# -- evaluating the interventions ------------------------------------------------------------------

#: ``(row of the misclassified sample in x, the layout columns turned off)``
_Intervention = Tuple[int, List[int]]

#: the most interventions of one vmapped call when ``chunk_size`` is not given ...
_DEFAULT_CHUNK = 64
#: ... and the most bytes their edited weight copies may take together
_COPY_BUDGET = 256 * 2**20


class _SampleArgs:
    """The misclassified samples and their extra forward arguments, cut per intervention as
    the loop cuts them (``x[i : i + 1]``, each per-sample tensor's row ``i``).

    Which arguments are per sample is decided once, on the whole batch (a tensor whose first
    dimension is the number of inputs), and kept: a shared tensor whose first dimension happens
    to equal the number of misclassified samples stays shared."""

    def __init__(self, x: Tensor, extra: Tuple[Any, ...], keyword: Dict[str, Any], batch: int,
                 wrong: Tensor) -> None:
        """``extra`` and ``keyword`` as given for all ``batch`` inputs; ``x`` and ``wrong`` the
        misclassified samples and their rows among the inputs."""
        self.x = x
        self.extra = tuple(_rows(a, wrong, batch) for a in extra)
        self.keyword = {k: _rows(v, wrong, batch) for k, v in keyword.items()}
        self.cut_extra = tuple(_per_sample(a, batch) for a in extra)
        self.cut_keyword = {k: _per_sample(v, batch) for k, v in keyword.items()}

    def _gathered(self, index: Tensor, unsqueeze: bool = False) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        def cut(value: Any, per_sample: bool) -> Any:
            if not per_sample:
                return value
            rows = value[index.to(value.device)]
            return rows.unsqueeze(1) if unsqueeze else rows

        return (tuple(cut(a, c) for a, c in zip(self.extra, self.cut_extra)),
                {k: cut(v, self.cut_keyword[k]) for k, v in self.keyword.items()})

    def passed(self) -> Any:
        """The extra arguments of all misclassified samples, as ``additional_forward_args``."""
        return self.keyword if self.keyword else (self.extra or None)

    def one(self, i: int) -> Tuple[Tensor, Tuple[Any, ...], Dict[str, Any]]:
        """Sample ``i`` with a batch dimension of 1, as the loop passes it."""
        extra, keyword = self._gathered(torch.arange(i, i + 1))
        return self.x[i : i + 1], extra, keyword

    def rows(self, samples: Sequence[int]) -> Tuple[Tensor, Tuple[Any, ...], Dict[str, Any]]:
        """One row per entry of ``samples``: ``x`` and every per-sample tensor indexed by them."""
        index = torch.tensor(list(samples), dtype=torch.long)
        extra, keyword = self._gathered(index)
        return self.x[index.to(self.x.device)], extra, keyword

    def stacked(self, samples: Sequence[int]) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
        """``(arguments, in_dims)`` of vmap for one intervention per entry of ``samples``: every
        per-sample tensor as ``(N, 1, ...)`` (so each vmapped call sees the loop's ``x[i : i + 1]``),
        everything else shared."""
        index = torch.tensor(list(samples), dtype=torch.long)
        extra, keyword = self._gathered(index, unsqueeze=True)
        x = self.x[index.to(self.x.device)].unsqueeze(1)
        args = (x, extra, keyword)
        dims = (0, tuple(0 if c else None for c in self.cut_extra),
                {k: 0 if self.cut_keyword[k] else None for k in keyword})
        return args, dims


def _zeroed_copies(
    params: Dict[str, Tensor], units: UnitEntries, edits: Sequence[Sequence[int]]
) -> Dict[str, Tensor]:
    """``{name: (N, *shape)}``: for every parameter that turning off some ``edits[n]`` (layout
    columns) edits, one copy per edit with that edit's entries set to zero (``+0.0``, as
    :func:`~captum_paramsal.interventions.turn_off` sets them); the others are not copied."""
    wanted: Dict[str, Dict[int, Tuple[Tensor, List[int], List[int]]]] = {}  # name -> block -> (block, slots, rows)
    for n, columns in enumerate(edits):
        for column in columns:
            blocks, row = units.blocks(column)
            for name, block in blocks:
                _, slots, rows = wanted.setdefault(name, {}).setdefault(id(block), (block, [], []))
                slots.append(n)
                rows.append(row)
    copies: Dict[str, Tensor] = {}
    for name, per_block in wanted.items():
        base = params[name].detach()
        numel = base.numel()
        flat = base.reshape(-1).repeat(len(edits))  # row-major, as edited_values indexes it
        index = [
            block[torch.tensor(rows, device=block.device)]
            + torch.tensor(slots, device=block.device)[:, None] * numel
            for block, slots, rows in per_block.values()
        ]
        flat.index_fill_(0, torch.cat(index).reshape(-1).to(flat.device), 0)
        copies[name] = flat.view(len(edits), *base.shape)
    return copies


def _vmapped_chunk(
    model: nn.Module,
    output_fn: Callable[[Any], Tensor],
    params: Dict[str, Tensor],
    samples: _SampleArgs,
    chunk: Sequence[_Intervention],
    units: UnitEntries,
) -> Tensor:
    """The class probabilities after each intervention of ``chunk``, ``(N, classes)``: one
    ``vmap`` over ``functional_call`` with the edited parameters stacked, the rest shared."""
    copies = _zeroed_copies(params, units, [columns for _, columns in chunk])
    args, dims = samples.stacked([i for i, _ in chunk])

    def one(weights: Dict[str, Tensor], x: Tensor, extra: Tuple[Any, ...], keyword: Dict[str, Any]) -> Tensor:
        return torch.softmax(output_fn(functional_call(model, weights, (x, *extra), keyword)), dim=-1)

    with torch.no_grad(), _quiet_batching_fallbacks():
        out = vmap(one, in_dims=({name: 0 for name in copies}, *dims))(copies, *args)
    return out[:, 0]


def _looped(
    model: nn.Module,
    output_fn: Callable[[Any], Tensor],
    layout: SaliencyLayout,
    samples: _SampleArgs,
    interventions: Sequence[_Intervention],
) -> List[Tensor]:
    """The class probabilities after each intervention, one ``turn_off`` block and one
    one-sample forward each (the exact reference the vmapped path is checked against)."""
    out = []
    for i, columns in interventions:
        with turn_off(model, columns, layout=layout):
            x, extra, keyword = samples.one(i)
            out.append(_probabilities(model, x, output_fn, extra, keyword)[0])
    return out


# Many interventions as the rows of one batch. Zeroing a unit whose entries are the whole
# weight of one output channel of a layer that reads its weight only in its own forward
# (Linear, convolutions, BatchNorm, GroupNorm, LayerNorm) changes that layer's output in that
# channel alone, to the channel's bias entry (zero without a bias): 0 * x sums to 0 and the
# bias is added. So no weight copy is needed: a forward hook on the layer replaces, row by
# row, the channels the row's intervention turns off. The rows' samples then share one
# batched forward, as a plain forward of that many samples costs (vmap's weight copies turn
# every convolution into a grouped one, about twice as slow on a CPU).

#: the layers the masks path hooks, and the axis of their output that their weight's units index
_OUTPUT_AXIS: Dict[type, int] = {
    nn.Linear: -1, nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1,
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1,
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 1, nn.BatchNorm3d: 1, nn.GroupNorm: 1, nn.LayerNorm: -1,
}


class _NotRowwise(RuntimeError):
    """A hooked layer's output does not have the batch's rows first and the units' channels
    along the expected axis: the masks path cannot run this model."""


def _channel_entries(module: nn.Module, weight: Tensor) -> Optional[Tensor]:
    """``(channels, entries)`` flat indices of each output channel's weights of ``module``
    (each row sorted), or None where that is not one block per channel."""
    flat = torch.arange(weight.numel(), device=weight.device).view(weight.shape)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if module.groups != 1:
            return None
        flat = flat.transpose(0, 1)  # (in, out, *kernel): the output channels are axis 1
    if isinstance(module, nn.LayerNorm) and weight.dim() != 1:
        return None
    return flat.reshape(flat.shape[0], -1)


def _output_channels(model: nn.Module, layout: SaliencyLayout, units: UnitEntries) -> Optional[List[List[nn.Module]]]:
    """Per non-empty layout entry (``units.entries``), the layers whose output channel ``u`` is
    unit ``u`` of the entry (a tied weight's every layer); None where some entry's units are
    not whole output channels of such layers (heads, neurons, embeddings, a weight read by
    another kind of module)."""
    from ..per_sample.selection import select_parameters

    if not units.entries or any(entry.is_group for entry in units.entries):
        return None
    selection = {p.name: p for p in select_parameters(model, [entry.name for entry in units.entries]).params}
    per_entry: List[List[nn.Module]] = []
    for entry in units.entries:
        blocks, _ = units.blocks(entry.slice.start)
        if len(blocks) != 1 or blocks[0][0] != entry.name:
            return None
        selected = selection[entry.name]
        layers = []
        for module, attribute in selected.owners:
            if type(module) not in _OUTPUT_AXIS or attribute != "weight":
                return None
            want = _channel_entries(module, selected.param)
            got = blocks[0][1]
            if want is None or want.shape != got.shape or not torch.equal(want, got.sort(dim=1).values.to(want.device)):
                return None
            layers.append(module)
        if not layers:
            return None
        per_entry.append(layers)
    return per_entry


def _masked_chunk(
    model: nn.Module,
    output_fn: Callable[[Any], Tensor],
    layers: List[List[nn.Module]],
    samples: _SampleArgs,
    chunk: Sequence[_Intervention],
    units: UnitEntries,
) -> Tensor:
    """The class probabilities after each intervention of ``chunk``, ``(N, classes)``: the
    interventions' samples as the rows of one forward, each hooked layer setting the output
    channels that row's intervention turns off to their bias entries (zero without a bias)."""
    pairs: Dict[int, Tuple[List[int], List[int]]] = {}  # entry position -> (rows, units) turned off
    for n, (_, columns) in enumerate(chunk):
        for column in columns:
            position, unit = units.locate(column)
            at = pairs.setdefault(position, ([], []))
            at[0].append(n)
            at[1].append(unit)
    rows = len(chunk)

    def hook_of(where: Tensor, which: Tensor, channels: int, axis: int) -> Callable[..., None]:
        def replace(module: nn.Module, args: Any, output: Any) -> None:
            if (not isinstance(output, Tensor) or output.dim() < 2 or output.shape[0] != rows
                    or output.shape[axis] != channels):
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise _NotRowwise(f"{type(module).__name__} gave {shape} for {rows} rows")
            # in place, and only the turned-off (row, channel) pairs: the hook runs first among the
            # layer's forward hooks, on an output that nothing else holds yet
            view = output.movedim(axis, 1) if axis != 1 else output
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                view[where, which] = bias.detach()[which].to(output.dtype).view(-1, *[1] * (view.dim() - 2))
            else:
                view[where, which] = 0
        return replace

    handles = []
    try:
        for position, (where, which) in pairs.items():
            for layer in layers[position]:
                device = layer.weight.device
                hook = hook_of(torch.tensor(where, device=device), torch.tensor(which, device=device),
                               units.entries[position].num_units, _OUTPUT_AXIS[type(layer)])
                handles.append(layer.register_forward_hook(hook, prepend=True))
        x, extra, keyword = samples.rows([i for i, _ in chunk])
        return _probabilities(model, x, output_fn, extra, keyword)
    finally:
        for handle in handles:
            handle.remove()


def _chunks(
    interventions: Sequence[_Intervention], units: UnitEntries, sizes: Dict[str, int], chunk_size: Optional[int]
) -> List[Tuple[int, int]]:
    """``(start, stop)`` of each vmapped call: ``chunk_size`` interventions, or without it up to
    :data:`_DEFAULT_CHUNK`, fewer where their edited copies would pass :data:`_COPY_BUDGET` bytes."""
    if chunk_size is not None:
        for _, columns in interventions:
            units.names(columns)  # resolves every unit before anything runs: a bad one raises here
        return [(s, min(s + chunk_size, len(interventions))) for s in range(0, len(interventions), chunk_size)]
    bounds: List[Tuple[int, int]] = []
    start, touched, nbytes = 0, set(), 0
    for n, (_, columns) in enumerate(interventions):
        names = set(units.names(columns))  # resolves every unit before anything runs: a bad one raises here
        grown = nbytes + sum(sizes[name] for name in names - touched)
        if n > start and (n - start + 1 > _DEFAULT_CHUNK or (n - start + 1) * grown > _COPY_BUDGET):
            bounds.append((start, n))
            start, touched, grown = n, set(), sum(sizes[name] for name in names)
        touched |= names
        nbytes = grown
    bounds.append((start, len(interventions)))
    return bounds


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text or (
        "can't allocate" in text)


def _agrees(a: Tensor, b: Tensor) -> bool:
    """Whether the vmapped and the looped probabilities of one intervention agree to the
    round-off of the dtype (batched kernels sum in another order)."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
    return bool(torch.allclose(a.to(b.dtype), b, rtol=0.0, atol=max(eps**0.5, 1e-12), equal_nan=True))


def _batched(
    model: nn.Module,
    output_fn: Callable[[Any], Tensor],
    layout: SaliencyLayout,
    samples: _SampleArgs,
    interventions: Sequence[_Intervention],
    chunk_size: Optional[int],
    method: str,
    probes: Sequence[_Intervention] = (),
) -> Optional[List[Tensor]]:
    """The probabilities after each intervention, by chunks of the ``"masks"`` or the
    ``"vmap"`` path.

    With ``probes`` (interventions that edit every parameter of the layout, run first): None
    where the path cannot run the model (masks: a unit that is not a layer's output channel,
    a layer's output without the rows first; vmap: an op it cannot batch), or where it gives
    other values than the loop on a probe or on the first chunk's last intervention (a model
    that reads a weight other than through its layer's forward, or, for vmap, its module's
    attribute). Without them, the path's errors are raised. A chunk that runs out of memory
    is split in halves."""
    units = UnitEntries(model, layout)
    params = dict(model.named_parameters())
    check = bool(probes)
    if method == "masks":
        layers = _output_channels(model, layout, units)
        if layers is None:
            if check:
                return None
            raise ValueError("method='masks' needs every unit of the layout to be a whole output channel of a "
                             f"{', '.join(t.__name__ for t in _OUTPUT_AXIS)} layer; use 'vmap' or 'loop'")

        def evaluate(chunk: Sequence[_Intervention]) -> Tensor:
            return _masked_chunk(model, output_fn, layers, samples, chunk, units)

        sizes = {name: 0 for name in params}  # no weight copies: chunks of _DEFAULT_CHUNK
    else:
        def evaluate(chunk: Sequence[_Intervention]) -> Tensor:
            return _vmapped_chunk(model, output_fn, params, samples, chunk, units)

        sizes = {name: p.numel() * p.element_size() for name, p in params.items()}
    pending = list(reversed(_chunks(interventions, units, sizes, chunk_size)))

    def agrees_with_loop(probs: Tensor, intervention: _Intervention) -> bool:
        if _agrees(probs, _looped(model, output_fn, layout, samples, [intervention])[0]):
            return True
        _log.log(_FALLBACK_LEVEL[method], "pruning_curves: %s runs this model otherwise than its own forward does; %s",
                 method, _FALLBACK_NEXT[method])
        return False

    if check:
        pending.append((-1, -1))  # the probes first
    out: List[Tensor] = []
    while pending:
        start, stop = pending.pop()
        chunk = list(probes) if start < 0 else interventions[start:stop]
        try:
            probs = evaluate(chunk)
        except Exception as error:  # noqa: BLE001 - which errors vmap (or a model in a batch) raises is not documented
            if _is_oom(error) and len(chunk) > 1 and start >= 0:
                middle = (start + stop) // 2
                pending += [(middle, stop), (start, middle)]
                continue
            if not check:
                raise
            first = str(error).splitlines()[0][:200] if str(error) else ""
            _log.log(_FALLBACK_LEVEL[method], "pruning_curves: %s cannot run this model (%s: %s); %s",
                     method, type(error).__name__, first, _FALLBACK_NEXT[method])
            return None
        if check and start < 0 and not all(agrees_with_loop(p, c) for p, c in zip(probs, chunk)):
            return None
        if check and start == 0 and not agrees_with_loop(probs[-1], chunk[-1]):
            return None
        if start >= 0:
            out += list(probs.unbind(0))
    return out


#: a fallback from masks to vmap is still fast (DEBUG); from vmap to the loop, slow (INFO)
_FALLBACK_LEVEL = {"masks": logging.DEBUG, "vmap": logging.INFO}
_FALLBACK_NEXT = {"masks": "trying vmap", "vmap": "turning units off one intervention at a time"}


# -- the pruning test ----------------------------------------------------------------------------

METHODS = ("auto", "masks", "vmap", "loop")


def pruning_curves(
    model: nn.Module,
    ps: ParameterSaliency,
    inputs: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5, 10, 25, 50),
    modes: Sequence[str] = MODES,
    seed: int = 0,
    internal_batch_size: Optional[int] = None,
    additional_forward_args: Any = None,
    method: str = "auto",
    chunk_size: Optional[int] = None,
) -> PruningResult:
    """Turn off the k most salient, k random and k least salient units of each misclassified
    sample among ``inputs`` (docs/METHOD.md, "The paper's validation experiments") and record what changes.

    Saliency (standardized when ``ps`` has statistics; the loss at the true label, as the
    paper) is computed once for all misclassified samples. Each intervention (a sample, a k, a
    mode) is the forward of that one sample through the model with the chosen units zeroed,
    exactly as inside :func:`~captum_paramsal.interventions.turn_off` (``layout=ps.layout``),
    and the model is never changed.

    How the interventions are evaluated (``method``):

    * ``"masks"``: many at once, as the rows of one batched forward of their samples; each
      layer that holds units (Linear, convolutions, BatchNorm, GroupNorm, LayerNorm, whose
      weight's unit ``u`` is output channel ``u``) gets a forward hook that sets, row by row,
      the output channels that row's intervention turns off to their bias entries (zero
      without a bias): what zeroing those weights makes the layer give, with no weight
      copied. Like the saliency itself (the model runs in eval mode, so samples of a batch
      do not interact), it needs a model whose samples do not interact in a batch. Only
      where every unit of the layout is such a channel (not heads or neurons, not an
      embedding's rows, not a transposed convolution with groups); a ValueError otherwise.
    * ``"vmap"``: many at once, several samples' in one call: ``torch.func.vmap`` over
      ``torch.func.functional_call``, each intervention with its own copy of the parameters
      its units lie in (those entries set to zero) and every other parameter, and every
      buffer, shared (any unit scheme; each vmapped call sees one sample, as the loop).
    * ``"loop"``: one ``turn_off`` block and one forward per intervention (the reference).
    * ``"auto"`` (the default): ``"masks"`` where the layout allows it, else ``"vmap"``, each
      checked against ``"loop"`` first, on sample 0 with its most salient unit of every
      layout entry off and with every other unit of every entry off, on the last
      misclassified sample with its most salient unit of every entry off, and on the first
      call's last intervention. ``"masks"`` gives way to ``"vmap"`` where a hooked layer's
      output does not have the samples first or the check fails (a model that reads a
      weight other than through its layer's forward), logged at DEBUG level; ``"vmap"``
      gives way to ``"loop"`` where vmap cannot run the model (data-dependent control flow,
      as in Hugging Face models' attention-mask handling; an op without a batching rule;
      randomness; ...) or gives other values (a model that reads a weight other than
      through its module's attribute, which ``functional_call`` replaces), logged at INFO
      level, both on the ``captum_paramsal.analysis.turn_off_curves`` logger.
      :attr:`PruningResult.method` says which ran.

    Each unit's entries are resolved once per call, by
    :func:`~captum_paramsal.units.resolve_entries` as ``turn_off`` resolves them. Memory: a
    batched call takes ``chunk_size`` interventions, by default up to 64 (for vmap fewer where
    their weight copies would pass 256 MiB together); one that runs out of memory is split in
    halves. The model runs in eval mode (BatchNorm reads its running statistics).

    All give the same records, up to float round-off in the probabilities (batched kernels
    sum in another order, ~1e-7 in float32); the random units are the same draws. Forward
    hooks of the model run once per batched call, on batched tensors.

    Args:
        model: the model ``ps`` explains.
        ps: a :class:`~captum_paramsal.ParameterSaliency` of ``model``.
        inputs, labels: a batch and its true labels.
        ks: numbers of units to turn off.
        modes: any of ``"salient"``, ``"random"``, ``"least"``.
        seed: seeds the random units (one draw per sample and k).
        internal_batch_size: as in :meth:`ParameterSaliency.attribute`, bounds memory; also
            the pieces of the forward that finds the misclassified samples (default 64 samples).
        additional_forward_args: as in :meth:`ParameterSaliency.attribute` (a dict is passed by
            keyword, e.g. ``{"attention_mask": mask}``); per-sample tensors are cut to each
            sample. The class probabilities are the softmax of ``ps.output_fn(model output)``
            (a Hugging Face model's logits), which must be ``(B, classes)``. Units are those of
            ``ps.layout``: heads or neurons under ``units="heads"`` / ``"neurons"``.
        method: ``"auto"``, ``"masks"``, ``"vmap"`` or ``"loop"``, see above.
        chunk_size: the number of interventions per batched call (bounds memory: each holds
            its activations, and under vmap its own copy of the parameters it edits); None:
            as above.

    Returns:
        :class:`PruningResult`.

    Raises:
        ValueError: ``ps`` of another model, unknown modes or method, ks that are not positive
            ints or exceed the number of units, labels that do not match, no misclassified
            sample, a ``chunk_size`` that is not a positive int, or ``method="masks"`` where
            some unit is not a layer's output channel.
        TypeError: labels that are not integers.
        RuntimeError: with ``method="masks"`` or ``"vmap"``, whatever the path raises on the model.

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> from captum_paramsal.analysis import pruning_curves
        >>> ps = ParameterSaliency(model)
        >>> ps.stats = ps.fit_stats(val_loader)
        >>> result = pruning_curves(model, ps, images, labels, ks=(1, 5, 25))
        >>> print(result.to_markdown())
        >>> slow = pruning_curves(model, ps, images, labels, ks=(1, 5, 25), method="loop")
        >>> [r["corrected"] for r in slow.records] == [r["corrected"] for r in result.records]
        True
    """
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be among {MODES}, got {list(modes)!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_internal_batch_size(internal_batch_size)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per input ({inputs.shape[0]})")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels (any integer dtype), got dtype {labels.dtype}")
    layout = ps.layout
    ks = _check_ks(ks, layout.num_columns)
    with evaluation_mode(model):
        batch = inputs.shape[0]
        extra, keyword = split_forward_args(additional_forward_args)
        before = _predict(model, inputs, ps.output_fn, extra, keyword, int(internal_batch_size or _PREDICT_CHUNK))
        predicted = before.argmax(-1)
        wrong = (predicted != labels.to(predicted.device)).nonzero().flatten()
        if len(wrong) == 0:
            raise ValueError("no misclassified samples among inputs: nothing to correct")
        x, y = inputs[wrong], labels[wrong].to(predicted.device)
        samples = _SampleArgs(x, extra, keyword, batch, wrong)
        z = ps.attribute(x, target=y, additional_forward_args=samples.passed(),
                         internal_batch_size=internal_batch_size).detach()
        generator = torch.Generator().manual_seed(seed)
        plan: List[Tuple[int, int, str]] = []
        interventions: List[_Intervention] = []
        for i in range(len(wrong)):
            order = z[i].argsort(descending=True)
            for k in ks:
                chosen = {  # the random draw comes for every k, whichever modes run: seeds keep their units
                    "salient": order[:k],
                    "least": order[-k:],
                    "random": torch.randperm(layout.num_columns, generator=generator)[:k],
                }
                for mode in modes:
                    plan.append((i, k, mode))
                    interventions.append((i, chosen[mode].tolist()))
        probs, took = None, "loop"
        paths = {"auto": ("masks", "vmap"), "masks": ("masks",), "vmap": ("vmap",), "loop": ()}[method]
        probes: List[_Intervention] = []
        if method == "auto":
            # sample 0 without its most salient unit, and without every other unit, of each entry; the last
            # sample without its most salient unit of each entry (so that the probes' batch holds two samples)
            entries = [e for e in layout if e.num_units > 0]
            last = len(wrong) - 1
            probes = [(0, [e.slice.start + int(z[0, e.slice].argmax()) for e in entries]),
                      (0, [c for e in entries for c in range(e.slice.start, e.slice.stop, 2)]),
                      (last, [e.slice.start + int(z[last, e.slice].argmax()) for e in entries])]
        for path in paths:
            probs = _batched(model, ps.output_fn, layout, samples, interventions, chunk_size, path, probes)
            if probs is not None:
                took = path
                break
        if probs is None:
            probs = _looped(model, ps.output_fn, layout, samples, interventions)
        records: List[Dict[str, Any]] = []
        for (i, k, mode), p in zip(plan, probs):
            true, bad = int(y[i]), int(predicted[wrong[i]])
            p0 = before[wrong[i]]
            records.append({
                "sample": int(wrong[i]),
                "k": k,
                "mode": mode,
                "corrected": bool(p.argmax() == true),
                "delta_true_prob": float(p[true] - p0[true]),
                "delta_wrong_prob": float(p[bad] - p0[bad]),
            })
    return PruningResult(records, ks, list(modes), len(wrong), inputs.shape[0], took)
