"""LoRA adapters swapped at run time: every adapter split the way the conversion split the base graph.

Stage order in the job: :func:`read_adapter_list` + :func:`load_adapters` at load (every check, before
any heavy work); :func:`lora_alpha_to_input` after preparing the graph (``--lora-alpha-from-input``);
:func:`plan_adapters` (scales, encodings to propagate); :func:`fit_adapters` once the converted graph
is final; :func:`save_adapters` into the staging folder. The result is one :class:`AdaptersRecord`.
"""

from mha2sha.adapters.alpha import (
    LORA_ALPHA,
    AlphaRecord,
    adapter_scale,
    alpha_encoding,
    alpha_encodings,
    lora_alpha_to_input,
)
from mha2sha.adapters.fit import fit_adapters, plan_adapters, sha_names
from mha2sha.adapters.listing import AdapterEntry, read_adapter_list
from mha2sha.adapters.lora import LoraGraph, LoraTensor, find_lora
from mha2sha.adapters.record import AdapterResult, AdaptersRecord
from mha2sha.adapters.save import ADAPTERS_DIR, ADAPTERS_FILE, save_adapters
from mha2sha.adapters.weights import Adapter, AdapterSet, load_adapters

__all__ = [
    "ADAPTERS_DIR",
    "ADAPTERS_FILE",
    "LORA_ALPHA",
    "Adapter",
    "AdapterEntry",
    "AdapterResult",
    "AdapterSet",
    "AdaptersRecord",
    "AlphaRecord",
    "LoraGraph",
    "LoraTensor",
    "adapter_scale",
    "alpha_encoding",
    "alpha_encodings",
    "find_lora",
    "fit_adapters",
    "load_adapters",
    "lora_alpha_to_input",
    "plan_adapters",
    "read_adapter_list",
    "save_adapters",
    "sha_names",
]
