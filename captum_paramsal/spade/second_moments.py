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
import torch.nn.functional as F
from torch import Tensor, nn

#: layer types with a moment rule; everything else (norm layers, Conv3d, ConvTranspose) stays dense
SUPPORTED_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: unfolded elements processed at once inside a hook (bounds the hook's memory)
_CHUNK_ELEMENTS = 1 << 25


def groups_of(module: nn.Module) -> int:
    return module.groups if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1


def grouped_weight(module: nn.Module) -> Tensor:
    """The weight as ``(G, R, C)``: groups, output rows per group, inputs (unfolded) per row."""
    weight = module.weight
    groups = groups_of(module)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _unfold(module: nn.Module, x: Tensor) -> Tensor:
    """``(N, G*D, L)``: a convolution's input patches, ``D`` the weight's inputs per output row."""
    conv2d = isinstance(module, nn.Conv2d)
    # the module's own padding (string forms "same"/"valid" and every padding_mode included),
    # applied the way Conv*d._conv_forward does, so that unfold below needs none
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    if conv2d:
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return F.unfold(
        x.unsqueeze(2),
        (1, module.kernel_size[0]),
        dilation=(1, module.dilation[0]),
        stride=(1, module.stride[0]),
    )


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
                    if not isinstance(module, SUPPORTED_TYPES):
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
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
            step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
            for i in range(0, rows.shape[0], step):
                chunk = rows[i : i + step]
                moment.matrix[0].addmm_(chunk.T, chunk)
                moment.rows += chunk.shape[0]
            return
        if x.dim() == (3 if isinstance(module, nn.Conv2d) else 2):  # an unbatched call
            x = x.unsqueeze(0)
        step = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel() * _patch_factor(module)))
        for i in range(0, x.shape[0], step):
            patches = _unfold(module, x[i : i + step])  # (N, G*D, L)
            n, _, positions = patches.shape
            grouped = patches.reshape(n, groups, per_group, positions).permute(1, 2, 0, 3)
            grouped = grouped.reshape(groups, per_group, n * positions)
            moment.matrix.baddbmm_(grouped, grouped.transpose(1, 2))
            moment.rows += n * positions


def _patch_factor(module: nn.Module) -> int:
    """How much unfolding inflates an input: the kernel's size over the stride's."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kernel = 1
        for k, s in zip(module.kernel_size, module.stride):
            kernel *= max(1, -(-k // s))
        return kernel
    return 1
