"""The adapter list a user passes with ``--lora-adaptor-list``: which adapters, where their files are.

Three spellings of one list are read (paths relative to the YAML file):

- the original MHA2SHA tool's ``{"lora_adaptor_list": [{name, safetensor_path, encodings_path}]}``;
- the same entries as a top-level list (aimet-onnx's ``write_adapter_list``);
- QAIRT's ``{"use_case": [{name, lora_weights, quant_overrides, ...}]}`` (``qairt-lora-importer``'s
  ``lora_config.yaml``; its ``model_name`` / ``output_path`` are not ours and are ignored).

Per entry: ``name`` (a plain file name: it names the adapter's output folder), the weights
(``safetensor_path`` / ``lora_weights``, required), the AIMET encodings of the graph with this
adapter (``encodings_path`` / ``quant_overrides``, optional: without them the adapter is converted
and verified in float only) and, with ``--lora-alpha-from-input``, its LoRA scale: ``alpha`` (optional, peft's ``lora_alpha``: the
scale is ``alpha / rank``) or ``lora_alpha`` (the scale itself, as this tool's ``adapters.yaml``
writes it). Everything wrong with the
list is one :class:`~mha2sha.errors.UserError` line naming the file and the entry.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mha2sha.errors import UserError

__all__ = ["AdapterEntry", "read_adapter_list"]

_WEIGHTS = ("safetensor_path", "lora_weights")
_ENCODINGS = ("encodings_path", "quant_overrides")
_IGNORED = frozenset({"model_name", "output_path"})  # QAIRT lora_config.yaml keys for its own tool
_KNOWN = frozenset({"name", "alpha", "lora_alpha", *_WEIGHTS, *_ENCODINGS}) | _IGNORED


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One adapter of the list, paths resolved against the list's folder."""

    name: str
    weights: Path
    encodings: Path | None = None
    alpha: float | None = None  # peft's lora_alpha: the scale is alpha / rank
    scale: float | None = None  # ``lora_alpha``: the scale itself (what the lora_alpha input is fed)


def _entries(data: Any, where: str) -> Sequence[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        for key in ("lora_adaptor_list", "use_case"):
            if key in data:
                listed = data[key]
                if not isinstance(listed, list):
                    raise UserError(f"{where}: '{key}' must be a list of adapters, not {type(listed).__name__}")
                return listed
    raise UserError(f"{where}: expected a 'lora_adaptor_list:' (or 'use_case:') list of adapters")


def _one_of(entry: Mapping[str, Any], keys: tuple[str, ...], where: str) -> str | None:
    given = [k for k in keys if entry.get(k) is not None]
    if len(given) > 1:
        raise UserError(f"{where}: give one of {' / '.join(keys)}, not both")
    if not given:
        return None
    value = entry[given[0]]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{given[0]}' must be a path, not {value!r}")
    return value


def _existing(base: Path, text: str, what: str, where: str) -> Path:
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise UserError(f"{where}: {what} {path} does not exist")
    return path


def _entry(raw: Any, base: Path, where: str) -> AdapterEntry:
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: expected a mapping with name, safetensor_path, encodings_path")
    unknown = sorted(str(k) for k in raw if k not in _KNOWN)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: 'name' is missing or empty")
    if name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise UserError(f"{where}: name {name!r} must be a plain file name (it names the output folder)")
    where = f"{where} ({name})"
    weights = _one_of(raw, _WEIGHTS, where)
    if weights is None:
        raise UserError(f"{where}: 'safetensor_path' (or 'lora_weights') is missing")
    encodings = _one_of(raw, _ENCODINGS, where)
    return AdapterEntry(
        name=name,
        weights=_existing(base, weights, "weights", where),
        encodings=_existing(base, encodings, "encodings", where) if encodings is not None else None,
        alpha=_positive(raw, "alpha", where),
        scale=_positive(raw, "lora_alpha", where),
    )


def _positive(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: '{key}' must be a positive number, not {value!r}")
    return float(value)


def read_adapter_list(path: str | os.PathLike[str]) -> list[AdapterEntry]:
    """Parse and check an adapter list (see the module docstring); every file it names must exist."""
    import yaml

    path = Path(path)
    where = f"adapter list {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UserError(f"{where}: malformed YAML: {problem}{at}") from None
    listed = _entries(data, where)
    if not listed:
        raise UserError(f"{where}: the list has no adapters")
    base = path.resolve().parent
    entries = [_entry(raw, base, f"{where}, entry {i + 1}") for i, raw in enumerate(listed)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise UserError(f"{where}: two adapters are named {e.name!r}")
        seen.add(e.name)
    return entries
