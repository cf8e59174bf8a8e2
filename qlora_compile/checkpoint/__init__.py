"""Checkpoint conversion: Hugging Face safetensors <-> bitsandbytes 4-bit folders."""

from .convert import ConversionError, ConversionResult, convert_checkpoint

__all__ = ["ConversionError", "ConversionResult", "convert_checkpoint"]
