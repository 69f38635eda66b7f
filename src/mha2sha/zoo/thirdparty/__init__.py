"""The third-party graph corpus: ONNX graphs that mha2sha's own zoo exporter did not write.

Users bring graphs made by other tools; this corpus makes such graphs reproducibly from tiny
random-weight models, so the converter can be tested on them:

- the zoo's SDPA variants (``mha2sha.zoo.VARIANTS``) exported with TorchScript (opset 17, 20),
  dynamo (default opset, 18) and dynamo at opset 23 (ONNX ``Attention``, ``RotaryEmbedding``,
  ``RMSNormalization``);
- ``optimum``: Hugging Face optimum-onnx exports (decoders with/without past, SDPA and eager,
  BERT, ViT, CLIP, Whisper and T5 encoder + merged decoder with an ``If``);
- ``ortopt``: onnxruntime's transformers optimizer on optimum exports (``com.microsoft.Attention``,
  ``MultiHeadAttention``, ``SkipLayerNormalization``, ``EmbedLayerNormalization``, ``BiasGelu`` ...);
- ``genai``: the onnxruntime-genai model builder (``com.microsoft.GroupQueryAttention`` with RoPE
  inside, ``SkipSimplifiedLayerNormalization``, ``seqlens_k`` / ``total_sequence_length``).

Each tool runs in its own venv with exact pins (``tools.VENVS``), cached with its outputs under
``$MHA2SHA_CACHE`` (``venvs/``, ``thirdparty/``). ``thirdparty_graphs()`` lists every graph without
building anything; ``graph.path()`` builds. ``python -m mha2sha.zoo.thirdparty [--build]`` prints
the catalogue. ``tests/thirdparty/test_corpus.py`` runs and converts every graph.
"""

from __future__ import annotations

from .catalogue import DEFAULT_DIMS, CorpusExportError, CorpusGraph, Features, thirdparty_graphs
from .tools import TOOLS, VENVS, ToolFailed, ToolUnavailable, build_tool, ensure_venv, prebuild

__all__ = [
    "DEFAULT_DIMS",
    "TOOLS",
    "VENVS",
    "CorpusExportError",
    "CorpusGraph",
    "Features",
    "ToolFailed",
    "ToolUnavailable",
    "build_tool",
    "ensure_venv",
    "prebuild",
    "thirdparty_graphs",
]
