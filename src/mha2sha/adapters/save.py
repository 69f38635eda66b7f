"""Write the adapters next to the SHA model (into the job's staging folder, so nothing is half-written).

```
adapters.yaml                              the list for the next tool (both spellings, paths relative to it)
adapters/<name>/<name>.safetensors          the SHA graph's tensors with this adapter (SHA names)
adapters/<name>/<name>.encodings            its AIMET encodings of the SHA graph (when it has encodings)
adapters/<name>/<name>.names.json           base-graph tensor -> SHA tensors, padding, zero-filled, lora_alpha
adapters/lora_tensor_names.txt             the SHA graph's updatable tensors, one per line
```
``adapters.yaml`` has the original tool's ``lora_adaptor_list`` (read back by ``--lora-adaptor-list``;
``lora_alpha`` is the value to feed the input with ``--lora-alpha-from-input``) and QAIRT's
``use_case`` list (``model_name``, ``lora_weights``, ``quant_overrides``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mha2sha.adapters.record import AdaptersRecord
from mha2sha.encodings import save_encodings

__all__ = ["ADAPTERS_DIR", "ADAPTERS_FILE", "save_adapters"]

ADAPTERS_FILE = "adapters.yaml"
ADAPTERS_DIR = "adapters"


def save_adapters(
    record: AdaptersRecord, stage: Path, model_file: str, version: str | None = None, *, model: Any = None
) -> list[Path]:
    """Write every adapter of ``record`` under ``stage`` (see the module docstring); the files written."""
    import yaml
    from safetensors.numpy import save_file

    root = stage / ADAPTERS_DIR
    root.mkdir(parents=True, exist_ok=True)
    written = []
    listing, use_case = [], []
    for result in record.adapters:
        folder = root / result.name
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / f"{result.name}.safetensors"
        save_file(result.tensors, str(weights))  # no metadata: safetensors writes a dict's keys in any order
        written.append(weights)
        entry: dict[str, Any] = {"name": result.name, "safetensor_path": weights.relative_to(stage).as_posix()}
        qairt: dict[str, Any] = {
            "name": result.name,
            "model_name": model_file,
            "lora_weights": entry["safetensor_path"],
        }
        if result.encodings is not None:
            encodings = folder / f"{result.name}.encodings"
            save_encodings(result.encodings, encodings, version or result.encodings.version, model=model)
            written.append(encodings)
            entry["encodings_path"] = qairt["quant_overrides"] = encodings.relative_to(stage).as_posix()
        if result.scale is not None:
            entry["lora_alpha"] = result.scale
        names = folder / f"{result.name}.names.json"
        names.write_text(
            json.dumps(
                {
                    "tensors": result.name_map,
                    "padded": {k: {"adapter_rank": a, "graph_rank": g} for k, (a, g) in result.padded.items()},
                    "zero_filled": result.zero_filled,
                    "lora_alpha": result.scale,
                },
                indent=1,
            )
        )
        written.append(names)
        listing.append(entry)
        use_case.append(qairt)
    tensor_list = root / "lora_tensor_names.txt"
    tensor_list.write_text("".join(f"{n}\n" for n in record.sha_tensors))
    written.append(tensor_list)
    listing_file = stage / ADAPTERS_FILE
    listing_file.write_text(yaml.safe_dump({"lora_adaptor_list": listing, "use_case": use_case}, sort_keys=False))
    written.append(listing_file)
    return written
