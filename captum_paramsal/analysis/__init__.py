"""The paper's analysis toolkit: pruning and fine-tuning tests, saliency-space neighbours,
data-set profiles; beyond the paper, error groups with their culprit units and verified repair."""

from .dataset_profiles import DatasetProfiles, dataset_profiles
from .error_groups import CulpritUnit, ErrorGroup, ErrorGroups, Exemplars, error_groups
from .finetune import FineTuneResult, NeighbourCorrection, finetune_salient, finetune_units, neighbour_correction
from .index import SaliencyIndex, SemanticAgreement, semantic_agreement
from .input_saliency_check import InputSaliencyCheck, input_saliency_check
from .repair import RepairResult, RepairRow, repair
from .turn_off_curves import PruningResult, pruning_curves

__all__ = [
    "CulpritUnit",
    "ErrorGroup",
    "ErrorGroups",
    "Exemplars",
    "RepairResult",
    "RepairRow",
    "error_groups",
    "repair",
    "DatasetProfiles",
    "FineTuneResult",
    "InputSaliencyCheck",
    "NeighbourCorrection",
    "PruningResult",
    "SaliencyIndex",
    "SemanticAgreement",
    "dataset_profiles",
    "finetune_salient",
    "finetune_units",
    "input_saliency_check",
    "neighbour_correction",
    "pruning_curves",
    "semantic_agreement",
]
