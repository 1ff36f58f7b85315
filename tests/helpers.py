"""What several test files share: the check that a user's model is left exactly as found, and a
small seeded model with its data.

The naive per-sample reference lives in ``naive.py``; this module holds the rest. Both are on the
import path through ``pythonpath = ["tests"]`` in ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# -- "the user's model is left exactly as found" -------------------------------------------------

# every per-module hook dictionary of torch.nn.Module (those this torch version has are read)
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# hooks registered on a tensor itself (Tensor.register_hook, register_post_accumulate_grad_hook)
TENSOR_HOOK_ATTRS = ("_backward_hooks", "_post_accumulate_grad_hooks")
# the hooks torch.nn.modules.module.register_module_*_hook installs for every module
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@dataclass(frozen=True)
class ParameterState:
    """One parameter as :func:`snapshot` found it: the object and a copy of what it held."""

    tensor: nn.Parameter
    value: Tensor
    requires_grad: bool
    data_ptr: int
    version: int
    grad: Optional[Tensor]
    grad_value: Optional[Tensor]
    hooks: Tuple[dict, ...]


@dataclass(frozen=True)
class ModelSnapshot:
    """Everything "the model is left exactly as found" means, recorded by :func:`snapshot` and
    compared by :func:`assert_unchanged`."""

    modules: Dict[str, nn.Module]
    training: Dict[str, bool]
    parameters: Dict[str, ParameterState]
    buffers: Dict[str, Tuple[Tensor, Tensor, int]]  # name -> (the buffer, a copy, its version)
    hooks: Dict[Tuple[str, str], dict]  # (module name, hook dictionary) -> a copy of it
    global_hooks: Dict[str, dict]

    @property
    def values(self) -> Dict[str, Tensor]:
        """Each parameter's value when the snapshot was taken (copies), by name."""
        return {name: state.value for name, state in self.parameters.items()}


def _tensor_hooks(tensor: Tensor) -> Tuple[dict, ...]:
    return tuple(dict(getattr(tensor, attr, None) or {}) for attr in TENSOR_HOOK_ATTRS)


def _global_hooks() -> Dict[str, dict]:
    import torch.nn.modules.module as module_module

    return {attr: dict(getattr(module_module, attr)) for attr in GLOBAL_HOOK_DICTS if hasattr(module_module, attr)}


def snapshot(model: nn.Module) -> ModelSnapshot:
    """Record ``model``'s modules (which objects, and their training flags), every parameter (the
    object, its value, requires_grad, storage, version counter, ``.grad`` object and value, and its
    tensor hooks), every buffer (object, value, version), every module hook dictionary and the
    global module hooks."""
    parameters = {}
    for name, p in model.named_parameters():
        grad = p.grad
        parameters[name] = ParameterState(
            tensor=p,
            value=p.detach().clone(),
            requires_grad=p.requires_grad,
            data_ptr=p.data_ptr(),
            version=p._version,
            grad=grad,
            grad_value=None if grad is None else grad.detach().clone(),
            hooks=_tensor_hooks(p),
        )
    return ModelSnapshot(
        modules=dict(model.named_modules()),
        training={name: m.training for name, m in model.named_modules()},
        parameters=parameters,
        buffers={name: (b, b.detach().clone(), b._version) for name, b in model.named_buffers()},
        hooks={(name, attr): dict(getattr(m, attr))
               for name, m in model.named_modules() for attr in HOOK_DICTS if hasattr(m, attr)},
        global_hooks=_global_hooks(),
    )


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit for bit (so -0.0 differs from 0.0, and a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _differences(model: nn.Module, before: ModelSnapshot) -> List[str]:
    after = snapshot(model)
    problems: List[str] = []
    if list(after.modules) != list(before.modules):
        problems.append(f"the modules are now {list(after.modules)}, were {list(before.modules)}")
    for name, module in before.modules.items():
        if name in after.modules and after.modules[name] is not module:
            problems.append(f"module {name!r} was replaced")
    for name, flag in before.training.items():
        if name in after.training and after.training[name] != flag:
            problems.append(f"module {name!r}: training was {flag}, is {after.training[name]}")

    if list(after.parameters) != list(before.parameters):
        problems.append(f"the parameters are now {list(after.parameters)}, were {list(before.parameters)}")
    for name, was in before.parameters.items():
        now = after.parameters.get(name)
        if now is None:
            continue
        if now.tensor is not was.tensor:
            problems.append(f"parameter {name} was replaced by another object")
        if now.value.shape != was.value.shape or now.value.dtype != was.value.dtype:
            problems.append(f"parameter {name} was {was.value.dtype} {tuple(was.value.shape)}, "
                            f"is {now.value.dtype} {tuple(now.value.shape)}")
        elif not _same_bits(now.value, was.value):
            change = float((now.value.double() - was.value.double()).abs().max())
            problems.append(f"parameter {name} changed value (largest change {change:.3g})")
        if now.requires_grad != was.requires_grad:
            problems.append(f"parameter {name}: requires_grad was {was.requires_grad}, is {now.requires_grad}")
        if now.data_ptr != was.data_ptr:
            problems.append(f"parameter {name} moved to other storage")
        if now.version != was.version:
            problems.append(f"parameter {name} was written in place (version {was.version} -> {now.version})")
        if was.grad is None:
            if now.grad is not None:
                problems.append(f"{name}.grad was None and is now set")
        elif now.grad is not was.grad:
            problems.append(f"{name}.grad was replaced" if now.grad is not None else f"{name}.grad was cleared")
        elif not _same_bits(now.grad, was.grad_value):
            problems.append(f"{name}.grad changed value")
        if now.hooks != was.hooks:
            problems.append(f"parameter {name}: tensor hooks were {was.hooks}, are {now.hooks}")

    if list(after.buffers) != list(before.buffers):
        problems.append(f"the buffers are now {list(after.buffers)}, were {list(before.buffers)}")
    for name, (buffer, value, version) in before.buffers.items():
        if name not in after.buffers:
            continue
        buffer2, value2, version2 = after.buffers[name]
        if buffer2 is not buffer:
            problems.append(f"buffer {name} was replaced by another object")
        if not _same_bits(value2, value):
            problems.append(f"buffer {name} changed value")
        if version2 != version:
            problems.append(f"buffer {name} was written in place (version {version} -> {version2})")

    for key, hooks in before.hooks.items():
        if after.hooks.get(key) != hooks:
            problems.append(f"module {key[0]!r}: {key[1]} were {hooks}, are {after.hooks.get(key)}")
    for key in after.hooks.keys() - before.hooks.keys():
        problems.append(f"module {key[0]!r}: {key[1]} appeared: {after.hooks[key]}")
    for attr, hooks in before.global_hooks.items():
        if after.global_hooks.get(attr) != hooks:
            problems.append(f"global module hooks {attr} were {hooks}, are {after.global_hooks.get(attr)}")
    return problems


def assert_unchanged(model: nn.Module, before: ModelSnapshot) -> None:
    """Assert ``model`` is as :func:`snapshot` recorded it in ``before``, listing every difference
    (an in-place write that put the old values back still shows, in the version counters)."""
    problems = _differences(model, before)
    assert not problems, "the model was not left as found:\n  " + "\n  ".join(problems)


# -- small seeded models and data ----------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Module:
    """Two convolutions and a Linear layer on ``(B, 1, 8, 8)``, float64, five classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    ).double()


def small_data(n: int, seed: int = 1):
    """``n`` random float64 images for :func:`small_cnn` and their labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def loader(x, y, batch_size: int) -> DataLoader:
    """``(x, y)`` in order, in batches of ``batch_size``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TiedLinears(nn.Module):
    """Two ``Linear(3, 3)`` layers sharing one weight (``b.weight`` is ``a.weight``), called in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def seeded_resnet18(num_classes: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """torchvision's resnet18 with ``num_classes`` outputs, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).to(dtype)
