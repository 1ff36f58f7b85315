"""How the library hooks a user's model: before the user's own hooks, for the calling thread only.

*First*: a forward hook of the user's that changes a layer's output (``lambda m, i, o: 2 * o``)
is part of what the model computes, downstream of the layer. The library's hooks read a
layer's inputs and tap its output as the layer's ``forward`` returned them, so they run
before every hook the module already has (``prepend=True``); the user's hooks then see the
tapped output, and the gradient that reaches the tap has passed through them, as in
autograd. (Global hooks, ``torch.nn.modules.module.register_module_forward_hook``, run
before any module's own hooks; one that changes outputs is not supported.)

*This thread*: hooks live on the module, so a forward of the same model in another thread
would run them too, pushing its calls into this pass's records. A hook made here does
nothing outside the thread that made it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` for calls on the current thread; a no-op (returns None) on any other."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return guarded


def hook_forward(module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> RemovableHandle:
    """A forward hook that runs before the module's existing ones, on this thread only."""
    return module.register_forward_hook(this_thread_only(hook), with_kwargs=with_kwargs, prepend=True)


def hook_forward_pre(module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> RemovableHandle:
    """A forward pre-hook that runs before the module's existing ones, on this thread only."""
    return module.register_forward_pre_hook(this_thread_only(hook), with_kwargs=with_kwargs, prepend=True)
