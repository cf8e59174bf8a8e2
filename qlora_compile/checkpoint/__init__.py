"""Checkpoint conversion: Hugging Face safetensors <-> bitsandbytes 4-bit folders."""

from .convert import ConversionError, ConversionResult, convert_checkpoint
from .load import load_quantized

__all__ = ["ConversionError", "ConversionResult", "convert_checkpoint", "load_quantized"]
