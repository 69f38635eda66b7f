"""Load a model lazily (external weights stay memory-mapped) and reject bad input with one line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from mha2sha.errors import UserError

__all__ = ["load_model", "fix_input_shapes", "require_static_inputs"]


def load_model(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf decode errors have many types
        raise UserError(f"not a valid ONNX model: {path} ({type(e).__name__}: {_first_line(e)})") from None
    if not model.graph.outputs:
        raise UserError(f"not a valid ONNX model: {path} (the graph has no outputs)")
    _check_external_data(model, path)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "unreadable"


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external weight file must exist and be long enough: fail now, not midway."""
    sizes: dict[Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = Path(tensor.base_dir) / tensor.location
        if file not in sizes:
            if not file.is_file():
                raise UserError(
                    f"external data file missing: {file} (needed by '{value.name}' of {path.name})"
                )
            sizes[file] = file.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file]:
            raise UserError(
                f"external data file truncated: {file} ends before '{value.name}' (needs {end} bytes)"
            )


def fix_input_shapes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Apply ``--input-shape name=1,128`` overrides to the graph inputs."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UserError(
                f"--input-shape names '{name}', which is not a model input (inputs: {', '.join(inputs)})"
            )
        value = inputs[name]
        if value.shape is not None and len(value.shape) != len(dims):
            raise UserError(
                f"--input-shape {name}: rank {len(dims)} given, the input has rank {len(value.shape)}"
            )
        value.shape = ir.Shape(dims)


def require_static_inputs(model: ir.Model) -> None:
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = value.shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            dims = "?" if shape is None else ",".join(str(d) if isinstance(d, int) else "1" for d in shape)
            raise UserError(
                f"input '{value.name}' has a dynamic shape {shape}; the split needs static shapes: "
                f"pass --input-shape {value.name}={dims}"
            )
