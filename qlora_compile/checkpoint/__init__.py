"""Checkpoints on disk: `ModelFolder` reads model folders, `OutputFolder` writes them (atomic, sharded,
resumable); conversion (Hugging Face safetensors -> bitsandbytes 4-bit) and loading are their clients."""

from .convert import ConversionError, ConversionResult, convert_checkpoint
from .load import load_quantized
from .model_folder import ModelFolder
from .output_folder import OutputFolder

__all__ = [
    "ConversionError",
    "ConversionResult",
    "ModelFolder",
    "OutputFolder",
    "convert_checkpoint",
    "load_quantized",
]
