"""Turn a :class:`Built` module into a self-contained static-shape ONNX file."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from .spec import Built, exporter_opset

TORCHSCRIPT_OPSET = 17


def export(built: Built, path: Path, exporter: str) -> None:
    """Export with static shapes (no dynamic axes) and the weights embedded in ``path``.

    The dynamo path runs the onnxscript optimizer (constant folding, dead-code removal) because
    the raw torch.export translation is full of no-op casts and shape arithmetic that a graph
    rewrite would otherwise have to look through. ``exporter`` is one of ``ALL_EXPORTERS``
    (``"torchscript"`` = opset 17, ``"dynamo"`` = torch's default opset, ``"dynamo23"`` ...).
    """
    kind, opset = exporter_opset(exporter)
    args = tuple(built.inputs.values())
    names = list(built.inputs)
    with torch.no_grad(), quiet_export():
        if kind == "torchscript":
            torch.onnx.export(
                built.module,
                args,
                str(path),
                input_names=names,
                output_names=built.output_names,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        else:
            program = torch.onnx.export(
                built.module,
                args,
                input_names=names,
                output_names=built.output_names,
                dynamo=True,
                opset_version=opset,  # None: torch's default
                optimize=True,
                verbose=False,
            )
            assert program is not None  # dynamo=True returns the program
            program.save(str(path), external_data=False)
    _check_names(built, path)


def _check_names(built: Built, path: Path) -> None:
    """Fail at build time, not in a converter test, if an exporter renamed or dropped an I/O."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != list(built.inputs) or got_out != built.output_names:
        raise RuntimeError(
            f"exported I/O {got_in} -> {got_out} differs from {list(built.inputs)} -> {built.output_names}"
        )


@contextlib.contextmanager
def quiet_export():
    """The exporters print progress lines, registry and tracer warnings; keep logs readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
