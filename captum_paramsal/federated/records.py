"""Replies and downlinks as Flower records, and what they weigh.

A reply's ``ArrayRecord`` holds, per layer, ``idx/<layer>`` (the selected unit indices, int64)
and ``val/<tensor>`` (the update of those units for each of the layer's tensors), and with
SCAFFOLD ``ctl/<tensor>`` (the control-variate change on the same units). The downlink is the
dense encoder (``enc/<tensor>``) and, with SCAFFOLD, the server variate (``ctl/<tensor>``).
Sizes are ``ArrayRecord.count_bytes()``: the serialized arrays' bytes (numpy's header
included) plus their keys, i.e. what is actually sent.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .aggregation import ClientUpdate

INDEX, VALUE, CONTROL, ENCODER = "idx/", "val/", "ctl/", "enc/"


def _array(tensor: Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def update_arrays(update: ClientUpdate) -> Dict[str, np.ndarray]:
    """A reply's arrays (for ``ArrayRecord``)."""
    arrays = {INDEX + layer: _array(indices.to(torch.int64)) for layer, indices in update.indices.items()}
    arrays.update({VALUE + name: _array(value) for name, value in update.values.items()})
    arrays.update({CONTROL + name: _array(value) for name, value in update.control.items()})
    return arrays


def update_from_arrays(arrays: Mapping[str, np.ndarray], num_examples: int, client: str = "?") -> ClientUpdate:
    """The :class:`ClientUpdate` in a reply's arrays; keys of another kind are kept under
    ``values`` so that :func:`~.aggregation.check_update` rejects the reply by name."""
    indices, values, control = {}, {}, {}
    for key, array in arrays.items():
        if key.startswith(INDEX):
            indices[key[len(INDEX):]] = _tensor(array)
        elif key.startswith(CONTROL):
            control[key[len(CONTROL):]] = _tensor(array)
        else:
            values[key[len(VALUE):] if key.startswith(VALUE) else key] = _tensor(array)
    return ClientUpdate(num_examples, indices, values, control, client)


def downlink_arrays(encoder: Mapping[str, Tensor], control: Optional[Mapping[str, Tensor]] = None
                    ) -> Dict[str, np.ndarray]:
    arrays = {ENCODER + name: _array(tensor) for name, tensor in encoder.items()}
    if control is not None:
        arrays.update({CONTROL + name: _array(tensor) for name, tensor in control.items()})
    return arrays


def downlink_from_arrays(arrays: Mapping[str, np.ndarray]) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]:
    encoder = {key[len(ENCODER):]: _tensor(a) for key, a in arrays.items() if key.startswith(ENCODER)}
    control = {key[len(CONTROL):]: _tensor(a) for key, a in arrays.items() if key.startswith(CONTROL)}
    return encoder, (control or None)


def record_of(arrays: Mapping[str, np.ndarray]):
    """A Flower ``ArrayRecord`` of ``arrays`` (keys kept in order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def arrays_of(record) -> Dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def record_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """What ``record_of(arrays).count_bytes()`` is: each array serialized as Flower does, plus its key."""
    return record_of(arrays).count_bytes()
