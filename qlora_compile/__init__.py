"""qlora-compile: QLoRA as a compiler pipeline."""

from .adapters import load_adapter, save_adapter
from .checkpoint import ConversionError, convert_checkpoint, load_quantized
from .config import QLoRAConfig
from .export import export_merged, export_nf4, export_onnx
from .format import QuantizedWeight, quantize_weight
from .lora import LoRA16Linear, LoRALinear, QLoRALinear
from .pipeline import compile

__all__ = [
    "ConversionError",
    "LoRA16Linear",
    "LoRALinear",
    "QLoRAConfig",
    "QLoRALinear",
    "QuantizedWeight",
    "compile",
    "convert_checkpoint",
    "export_merged",
    "export_nf4",
    "export_onnx",
    "load_adapter",
    "load_quantized",
    "quantize_weight",
    "save_adapter",
]
__version__ = "0.1.0"
