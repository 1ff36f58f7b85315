"""The paper's analysis toolkit: pruning and fine-tuning tests, saliency-space neighbours,
data-set profiles."""

from .dataset_profiles import DatasetProfiles, dataset_profiles
from .finetune import FineTuneResult, NeighbourCorrection, finetune_salient, neighbour_correction
from .index import SaliencyIndex, SemanticAgreement, semantic_agreement
from .turn_off_curves import PruningResult, pruning_curves

__all__ = [
    "DatasetProfiles",
    "FineTuneResult",
    "NeighbourCorrection",
    "PruningResult",
    "SaliencyIndex",
    "SemanticAgreement",
    "dataset_profiles",
    "finetune_salient",
    "neighbour_correction",
    "pruning_curves",
    "semantic_agreement",
]
