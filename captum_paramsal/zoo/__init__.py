"""Models the project trains itself, shipped inside the package (no download at run time)."""

from .colours import ColoursData, ColourSplit, colours_data, load_colours_model
from .digits import DigitsCNN, digits_data, load_digits_model

__all__ = [
    "ColourSplit",
    "ColoursData",
    "DigitsCNN",
    "colours_data",
    "digits_data",
    "load_colours_model",
    "load_digits_model",
]
