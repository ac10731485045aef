"""seahal.onnx: the HAL operators as ONNX functions, for exporters and ONNX runtimes.

:mod:`seahal.onnx.functions` holds one ONNX function (domain ``seahal``, body of standard ONNX ops)
per HAL operator; importing it needs ``onnx`` and ``onnxscript``, so this package imports nothing
by itself.
"""


def __getattr__(name: str):
    """``seahal.onnx.export_onnx`` (see :mod:`seahal.onnx.export`), imported on first use."""
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'seahal.onnx' has no attribute {name!r}")
