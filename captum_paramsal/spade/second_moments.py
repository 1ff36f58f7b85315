"""Each prunable layer's input second moment ``X Xᵀ``, from forward pre-hooks on one pass.

The rows of ``X`` are what the layer multiplies its weight with: a Linear layer's input vectors
(every leading position of a sequence input is a row), a convolution's unfolded patches (one row
per output position, ``C_in/groups * k`` or ``C_in/groups * kh * kw`` entries, in the order of the
weight's flattened ``(C_in/groups, kh, kw)``). A grouped convolution has one moment per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..per_sample.registry import find_rule, prunable_types

#: unfolded elements processed at once inside a hook (bounds the hook's memory)
_CHUNK_ELEMENTS = 1 << 25


def supported_types() -> Tuple[type, ...]:
    """The layer types SPADE prunes: those whose per-layer rule says which rows multiply the
    weight (``input_rows`` in the registry: Linear, Conv1d and Conv2d). Everything else (norm
    layers, Conv3d, ConvTranspose) stays dense."""
    return prunable_types()


def groups_of(module: nn.Module) -> int:
    """The weight's groups (a grouped convolution's ``groups``; 1 for a Linear layer)."""
    return int(getattr(module, "groups", 1))


def grouped_weight(module: nn.Module) -> Tensor:
    """The weight as ``(G, R, C)``: groups, output rows per group, inputs (unfolded) per row.

    Examples::

        >>> grouped_weight(nn.Conv2d(4, 6, 3, groups=2)).shape
        torch.Size([2, 3, 18])
    """
    weight = module.weight
    groups = groups_of(module)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


@dataclass
class SecondMoment:
    """``X Xᵀ`` per group, ``(G, C, C)``, and the number of rows of ``X`` it sums.

    Examples::

        >>> moment = SecondMoment(torch.zeros(1, 4, 4))
        >>> moment.matrix[0].addmm_(x.T, x); moment.rows += x.shape[0]     # x: (rows, 4)
        >>> moment.hessian()                  # 2 X Xᵀ / rows
    """

    matrix: Tensor
    rows: int = 0

    def hessian(self) -> Tensor:
        """SparseGPT's ``H = 2 X Xᵀ / rows`` (the mean keeps float32 sums in range).

        Examples::

            >>> collector.moments["fc.weight"].hessian().shape     # (1, in_features, in_features)
        """
        return self.matrix * (2.0 / max(self.rows, 1))


@dataclass
class SecondMomentCollector:
    """Forward pre-hooks that accumulate :class:`SecondMoment` of the named layers.

    ``layers`` maps a name (SPADE uses the weight's parameter name) to a layer, or to several
    layers that share one weight (a tied weight: their inputs add up in one moment; they must
    agree in type and groups). Use as a context manager around forward passes; the hooks are
    removed on exit, also on error.

    Examples::

        >>> collector = SecondMomentCollector({"fc.weight": model.fc})
        >>> with collector, torch.no_grad():
        ...     model(calibration_batch)
        >>> collector.moments["fc.weight"].hessian().shape     # (1, in_features, in_features)
    """

    layers: Dict[str, Union[nn.Module, Sequence[nn.Module]]]
    moments: Dict[str, SecondMoment] = field(default_factory=dict)
    _handles: List = field(default_factory=list)

    def __enter__(self) -> SecondMomentCollector:
        try:
            for name, layers in self.layers.items():
                group = [layers] if isinstance(layers, nn.Module) else list(layers)
                for module in group:
                    if not isinstance(module, supported_types()):
                        raise TypeError(f"layer {name!r} ({type(module).__name__}) has no second-moment rule")
                if len({(type(m), groups_of(m), tuple(m.weight.shape)) for m in group}) > 1:
                    raise TypeError(f"the layers of {name!r} differ in type, groups or weight shape")
                for module in group:
                    self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            self.add(name, module, args[0])

        return hook

    def add(self, name: str, module: nn.Module, x: Tensor) -> None:
        """Accumulate one input batch ``x`` of ``module`` (what the hooks call).

        Examples::

            >>> collector = SecondMomentCollector({"fc.weight": model.fc})
            >>> collector.add("fc.weight", model.fc, features)        # without hooks
        """
        weight = module.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        groups = groups_of(module)
        per_group = weight[0].numel()  # C_in/groups * kernel
        moment = self.moments.get(name)
        if moment is None:
            moment = SecondMoment(torch.zeros(groups, per_group, per_group, dtype=dtype, device=weight.device))
            self.moments[name] = moment
        x = x.detach().to(device=weight.device, dtype=dtype)
        rows_of = find_rule(module, "weight").input_rows
        for columns in rows_of(module, x, _CHUNK_ELEMENTS):  # (G, D, n)
            moment.matrix.baddbmm_(columns, columns.transpose(1, 2))
            moment.rows += columns.shape[-1]
