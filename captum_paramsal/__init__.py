"""captum-paramsal: parameter-space saliency for PyTorch models, on Captum's interfaces."""

from ._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency
from ._core.parameter_saliency import ParameterSaliency
from .layout import LayoutEntry, SaliencyLayout
from .saliency_profile import SaliencyProfile, UnitScore
from .spade import SPADE, SampleTargetedPruning
from .stats import SaliencyStats

__version__ = "0.1.0"

__all__ = [
    "LayoutEntry",
    "ParameterGuidedInputSaliency",
    "ParameterSaliency",
    "SPADE",
    "SaliencyLayout",
    "SaliencyProfile",
    "SaliencyStats",
    "SampleTargetedPruning",
    "UnitScore",
    "__version__",
]
