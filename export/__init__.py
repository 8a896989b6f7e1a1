"""loopgpt.export: ONNX export (split graphs + one single-file model), parity check, onnxruntime runner.

    loopgpt export onnx --checkpoint checkpoints/demo --out exports/demo
"""

from .manifest import ExportError
from .onnx_export import export_onnx
from .runtime import OnnxRunner, load_onnx

__all__ = ["ExportError", "OnnxRunner", "export_onnx", "load_onnx"]
