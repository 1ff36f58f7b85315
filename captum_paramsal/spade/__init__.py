"""SPADE: sample-targeted pruning before any Captum attribution (Moakhar et al., ICML 2024).

* :class:`SPADE` wraps an attribution method (``SPADE(IntegratedGradients(model)).attribute(x)``).
* :class:`SampleTargetedPruning` is the algorithm: one sample's sparse network, as a context.
* :mod:`.solver` holds the OBS / SparseGPT-style layer solver, :mod:`.second_moments` the
  per-layer ``X Xᵀ`` hooks, :mod:`.augment` the calibration views.

Layers are named by their weight parameter (``"fc1.weight"``), as everywhere in the library;
the weights are swapped with :func:`captum_paramsal.interventions.swapped_parameters`.

Examples::

    >>> from captum.attr import Saliency
    >>> from captum_paramsal.spade import SPADE, SampleTargetedPruning
    >>> attr = SPADE(Saliency(model), sparsity={"conv2.weight": 0.5, "fc1.weight": 0.9}).attribute(x, target=y)
    >>> with SampleTargetedPruning(model, sparsity=0.9).pruned(x[:1]) as weights:
    ...     sparse_logits = model(x[:1])
"""

from .augment import DefaultAugmentation, augmented_batch
from .obc import OBCTrajectory, obc_prune, obc_trajectory
from .sample_pruning import SampleTargetedPruning, prunable_weights
from .solver import exact_reconstruction, sparsegpt_prune
from .wrapper import SPADE, find_model

__all__ = [
    "SPADE",
    "DefaultAugmentation",
    "OBCTrajectory",
    "SampleTargetedPruning",
    "augmented_batch",
    "exact_reconstruction",
    "find_model",
    "obc_prune",
    "obc_trajectory",
    "prunable_weights",
    "sparsegpt_prune",
]
