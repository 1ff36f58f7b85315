"""Models the project trains itself, shipped inside the package (no download at run time)."""

from .digits import DigitsCNN, digits_data, load_digits_model

__all__ = ["DigitsCNN", "digits_data", "load_digits_model"]
