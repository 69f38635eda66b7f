"""Lowering of fused attention and contrib ops into standard ONNX primitives (before the split).

``lower_fused_ops(model)`` rewrites every op of :data:`LOWERINGS` in place, exactly (same math as
onnxruntime's CPU kernels), so the head split sees the primitive attention form; it returns a
:class:`LowerRecord` listing what was lowered and what was refused, with the reason.
"""

from mha2sha.lower.lower_pass import LowerFusedOpsPass, LowerRecord, lower_fused_ops
from mha2sha.lower.table import LOWERINGS, Lowering

__all__ = ["LOWERINGS", "LowerFusedOpsPass", "LowerRecord", "Lowering", "lower_fused_ops"]
