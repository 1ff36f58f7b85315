"""captum-paramsal: parameter-space saliency for PyTorch models, on Captum's interfaces."""

from ._core.parameter_saliency import ParameterSaliency
from .layout import LayoutEntry, SaliencyLayout

__version__ = "0.1.0"

__all__ = ["LayoutEntry", "ParameterSaliency", "SaliencyLayout", "__version__"]
