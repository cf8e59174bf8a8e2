"""qlora-compile: QLoRA as a compiler pipeline."""

from .format import QuantizedWeight, quantize_weight

__all__ = ["QuantizedWeight", "quantize_weight"]
__version__ = "0.1.0"
