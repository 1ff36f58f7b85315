"""SPADE: sample-targeted pruning before any Captum attribution (Moakhar et al., ICML 2024).

* :class:`SPADE` wraps an attribution method (``SPADE(IntegratedGradients(model)).attribute(x)``).
* :class:`SampleTargetedPruning` is the algorithm: one sample's sparse network, as a context.
* :mod:`.solver` holds the OBS / SparseGPT-style layer solver, :mod:`.second_moments` the
  per-layer ``X Xᵀ`` hooks, :mod:`.augment` the calibration views.
"""

from .augment import DefaultAugmentation, augmented_batch
from .sample_pruning import SampleTargetedPruning, swapped_weights
from .solver import exact_reconstruction, sparsegpt_prune
from .wrapper import SPADE, find_model

__all__ = [
    "SPADE",
    "DefaultAugmentation",
    "SampleTargetedPruning",
    "augmented_batch",
    "exact_reconstruction",
    "find_model",
    "sparsegpt_prune",
    "swapped_weights",
]
