"""qlora-compile: QLoRA as a compiler pipeline."""

from .adapters import load_adapter, save_adapter
from .config import QLoRAConfig
from .export import export_merged, export_nf4, export_onnx
from .format import QuantizedWeight, quantize_weight
from .lora import QLoRALinear
from .pipeline import compile

__all__ = [
    "QLoRAConfig",
    "QLoRALinear",
    "QuantizedWeight",
    "compile",
    "export_merged",
    "export_nf4",
    "export_onnx",
    "load_adapter",
    "quantize_weight",
    "save_adapter",
]
__version__ = "0.1.0"
