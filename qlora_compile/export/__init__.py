"""Export for inference: merged 16-bit folders, re-quantized NF4 folders, ONNX with MatMulBnb4."""

from .merged import export_merged
from .nf4 import LayerReport, export_nf4, format_report
from .onnx import export_onnx

__all__ = ["LayerReport", "export_merged", "export_nf4", "export_onnx", "format_report"]
