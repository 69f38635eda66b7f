"""AR (tokens per step) and CL (context length) changes of LLM step graphs: ``mha2sha build-ar``.

:func:`build_ar` is the job (variants, one shared weights file, token-loop proof), its
:class:`ArRecord` the only output; :class:`ChangeArPass` the graph rewrite; :func:`infer_contract`
the token-loop reading of a step graph.
"""

from __future__ import annotations

from mha2sha.arcl.build import BuildArOptions, build_ar, convert_and_build_ar
from mha2sha.arcl.contract import compare_step_graphs, infer_contract
from mha2sha.arcl.record import ArRecord, LoopRow, VariantRecord, VerificationFailed
from mha2sha.arcl.rewrite import ChangeArPass, ConstantRewrite

__all__ = [
    "ArRecord",
    "BuildArOptions",
    "ChangeArPass",
    "ConstantRewrite",
    "LoopRow",
    "VariantRecord",
    "VerificationFailed",
    "build_ar",
    "compare_step_graphs",
    "convert_and_build_ar",
    "infer_contract",
]
