"""Run ``mha2sha convert`` with a code variant patched in, to measure a change before making it.

    python benchmarks/variants.py VARIANT convert model.onnx -o out --no-verify

Variants:
- ``current``: nothing patched.
- ``onnx-ir-external``: external weights stay onnx_ir ``ExternalTensor`` s (the loader before
  ``StreamedExternalTensor``): every page read while slicing stays mapped in the process.
- ``save-serial`` / ``save-2workers``: ``ir.save`` external-data writes with 1 / 2 threads.
"""

from __future__ import annotations

import os
import sys


def _patch(variant: str) -> None:
    if variant == "current":
        return
    if variant == "onnx-ir-external":
        import mha2sha.io.load as load

        load._stream_external_tensors = lambda model: None
        return
    if variant in ("save-serial", "save-2workers"):
        import onnx_ir as ir

        original = ir.save
        workers = 1 if variant == "save-serial" else 2

        def save(*args, **kwargs):
            if kwargs.get("external_data") is not None:
                kwargs["max_workers"] = workers
            return original(*args, **kwargs)

        ir.save = save  # mha2sha.io.save calls ir.save through the module
        return
    raise SystemExit(f"unknown variant {variant}")


def _report_hwm() -> None:
    """Peak RSS of this address space (``ru_maxrss`` of a child also counts its parent at fork)."""
    path = os.environ.get("MHA2SHA_BENCH_HWM")
    if path:
        with open("/proc/self/status") as f:
            hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
        with open(path, "w") as out:
            out.write(hwm)


def main() -> int:
    variant, argv = sys.argv[1], sys.argv[2:]
    _patch(variant)
    from mha2sha.cli import main as cli_main

    try:
        return cli_main(argv)
    finally:
        _report_hwm()


if __name__ == "__main__":
    sys.exit(main())
