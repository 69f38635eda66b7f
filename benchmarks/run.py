"""Time and memory of ``mha2sha convert`` on full-size models against a ``cp`` of the same files.

For each model (a folder written by ``generate.py``: ``model.onnx`` + ``model.data`` + ``meta.json``):

1. ``cp -r <model> <tmp> && sync`` with a cold page cache: the floor for any tool that reads every
   weight and writes it again on the same disk.
2. ``mha2sha convert <model>/model.onnx -o <out> --no-verify`` then ``sync``, again from a cold
   page cache, in a subprocess (through ``variants.py``, which runs the CLI's ``main``): wall time
   (convert + sync, so dirty pages are paid for like cp's), exact peak RSS (``VmHWM`` of the
   process, includes file-backed pages) and peak anonymous / file-backed RSS (``/proc/<pid>/status``
   polled every 50 ms), per-phase time and RSS from the report.
3. Optionally ``mha2sha verify <model> <out>`` (blockwise verification against the
   original) and/or a full-model verification, measured the same way.

``--quantized`` measures the whole user job instead: ``mha2sha convert <model> --encodings
<model>.encodings --target htp`` with verification on (``--verify auto``), encodings from
``encodings_gen.py`` (synthetic, written once beside the model, not timed); code column ``<tag>+q``.

Cold cache = ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each measured command (needs root;
without it the run is marked "warm" and cp goes first so both see the same cache state).

    python benchmarks/run.py --dir /tmp/bench llama2-7b-hf-fp16 ... [--generate] [--verify blocks]
    python benchmarks/run.py --dir /tmp/bench --table     # only rewrite RESULTS.md from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from encodings_gen import synthetic_encodings  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"


# ----------------------------------------------------------------------------- measuring


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def measure(cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds, exit code, peak RSS (exact) and peak anon/file RSS (polled)."""
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status_kib(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if log:
        out.close()
    return {
        "seconds": round(seconds, 2),
        "exit": proc.returncode,
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "peak_anon_mb": round(peaks["RssAnon"] / 1024),
        "peak_file_mb": round(peaks["RssFile"] / 1024),
    }


def _warm(folder: Path) -> bool:
    """Page cache holding the input (as right after an export): read every file once, flush writes."""
    subprocess.run(["sync"], check=True)
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return True


def _sync_seconds() -> float:
    t = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- one model


def bench_model(
    folder: Path,
    *,
    verify: list[str],
    keep_output: bool,
    tag: str,
    variant: str = "current",
    cache: str = "cold",
    quantized: bool = False,
    build_ar: str | None = None,
) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    model = folder / "model.onnx"
    work = Path(tempfile.mkdtemp(prefix="mha2sha-bench-", dir=folder.parent))
    row: dict = {
        "model": folder.name,
        "tag": tag,
        "variant": variant,
        "shape": meta["shape"],
        "style": meta["style"],
        "dtype": meta["dtype"],
        "layers": meta["layers"],
        "ar": meta["ar"],
        "context": meta["context"],
        "weight_gb": round(meta["weight_bytes"] / 1e9, 2),
        "largest_tensor_mb": meta.get("largest_tensor_mb"),
    }
    try:
        prepare_cache = drop_caches if cache == "cold" else lambda: _warm(folder)
        row["cache"] = cache if prepare_cache() is not False else "warm"
        cp = measure(["cp", "-r", str(folder), str(work / "copy")])
        cp["seconds"] = round(cp["seconds"] + _sync_seconds(), 2)
        row["cp"] = cp
        shutil.rmtree(work / "copy")

        out = work / "out"
        prepare_cache()
        args = ["convert", str(model), "-o", str(out), "--no-verify"]
        if quantized:
            encodings = model.with_suffix(".encodings")
            if not encodings.exists():
                encodings.write_text(json.dumps(synthetic_encodings(model)))
            row["encodings_mb"] = round(encodings.stat().st_size / 1e6, 1)
            args = ["convert", str(model), "-o", str(out), "--encodings", str(encodings), "--target", "htp"]
            prepare_cache()
        if build_ar:
            args = ["build-ar", str(model), "--ar", build_ar, "-o", str(out), "--no-verify"]
        cmd = [sys.executable, str(HERE / "variants.py"), variant, *args]
        hwm = work / "hwm.txt"
        conv = measure(cmd, log=work / "convert.log", env={**os.environ, "MHA2SHA_BENCH_HWM": str(hwm)})
        if hwm.exists():  # exact peak of the converter's own address space (VmHWM)
            conv["peak_rss_mb"] = round(int(hwm.read_text()) / 1024)
        conv["seconds"] = round(conv["seconds"] + _sync_seconds(), 2)
        row["convert"] = conv
        if conv["exit"] != 0:
            row["convert"]["log_tail"] = (work / "convert.log").read_text()[-2000:]
        elif build_ar:
            report = json.loads((out / "model.ar.report.json").read_text())
            row["phases"] = {p["name"]: [round(p["seconds"], 2), round(p["peak_rss_mb"])] for p in report["phases"]}
            row["build_ar"] = {"ars": build_ar, "variants": [v["path"].rsplit("/", 1)[-1] for v in report["variants"]],
                               "shared_gb": round(report["shared_bytes"] / 1e9, 2)}  # fmt: skip
            row["output_gb"] = round(folder_bytes(out) / 1e9, 2)
        else:
            report = json.loads((out / "model.report.json").read_text())
            row["phases"] = {
                p["name"]: [round(p["seconds"], 2), round(p["peak_rss_mb"])] for p in report["phases"]
            }
            row["blocks_split"] = sum(b["status"] == "split" for b in report["blocks"])
            if report.get("verification"):
                v = report["verification"]
                row["verify_in_convert"] = {"mode": v.get("mode"), "ok": v["ok"], "notes": v.get("notes", [])}
            row["output_gb"] = round(folder_bytes(out) / 1e9, 2)
        row["ratio_vs_cp"] = round(conv["seconds"] / max(cp["seconds"], 1e-9), 2)
        for mode in verify if conv["exit"] == 0 else []:
            drop_caches()
            cmd = [sys.executable, "-m", "mha2sha.cli", "verify", str(model), str(out / "model.onnx")]
            cmd += ["--verify", mode]
            res = measure(cmd, log=work / f"verify-{mode}.log")
            res["log_tail"] = (work / f"verify-{mode}.log").read_text()[-600:]
            row[f"verify_{mode}"] = res
        if keep_output:
            row["output_dir"] = str(out)
    finally:
        if not keep_output:
            shutil.rmtree(work, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------- table


def _load_results() -> list[dict]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []


def _save_row(row: dict) -> None:
    key = (row["model"], row["tag"], row["cache"])
    rows = [r for r in _load_results() if (r["model"], r["tag"], r.get("cache")) != key]
    rows.append(row)
    RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")


def _phase(row: dict, name: str) -> str:
    for key, (sec, _) in row.get("phases", {}).items():
        if key.startswith(name):
            return f"{sec:.1f}"
    return "-"


def _verify_cell(row: dict, mode: str) -> str:
    v = row.get(f"verify_{mode}")
    inside = row.get("verify_in_convert")
    if not v and inside and inside.get("mode") == mode:
        return f"in convert: {_phase(row, 'verify')} s" + ("" if inside["ok"] else " FAIL")
    if not v:
        return "-"
    return f"{v['seconds']:.0f} / {v['peak_rss_mb']}" + ("" if v["exit"] == 0 else " FAIL")


def write_table() -> str:
    rows = sorted(
        _load_results(), key=lambda r: (r["tag"] != "current", r["weight_gb"], r["model"], r["cache"])
    )
    lines = [
        "# mha2sha convert: time and memory on full-size random-weight models",
        "",
        "Generated by `benchmarks/run.py` from `benchmarks/results.json` (do not edit by hand).",
        "Models from `benchmarks/generate.py` (AR 128, CL 1024, batch 1, eager attention, one external",
        "data file). `cp` = `cp -r` of the model folder + `sync`; convert = `mha2sha convert --no-verify`",
        "+ `sync` (includes interpreter start-up); both from the same page-cache state: cold =",
        "`drop_caches` before each, warm = input read once before each. Peak RSS = the converter's",
        "`VmHWM` (includes file-backed pages); anon = peak `RssAnon`. Phases are the converter's own",
        "timer. Verify = `mha2sha verify --verify blocks` (blocks) or `--verify full` (whole-model onnxruntime)",
        "(`--full`), seconds / peak RSS MB, run after the conversion. Machine: 2 cores, 24 GB RAM,",
        "one virtual disk (ext4; its throughput varies run to run by up to 2x).",
        "Code `<tag>+q` = the whole user job: `mha2sha convert --encodings <synthetic 1.0.0 W8A16> --target",
        "htp` with verification on (`--verify auto`, which picks blockwise for these sizes; its time is in",
        "the convert column and the `verify blocks` cell is the phase inside the conversion).",
        "",
        "| model | code | weights GB | cp s | convert s | x cp | peak RSS MB | peak anon MB "
        "| load s | prepare s | split s | save s | verify blocks | verify full | cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ar_rows = [r for r in rows if r.get("build_ar")]
    rows = [r for r in rows if not r.get("build_ar")]
    for r in rows:
        c = r.get("convert", {})
        exit_note = "" if c.get("exit") == 0 else f" (exit {c.get('exit')})"
        lines.append(
            f"| {r['model']} | {r['tag']} | {r['weight_gb']} | {r['cp']['seconds']:.1f} | "
            f"{c.get('seconds', 0):.1f}{exit_note} | {r.get('ratio_vs_cp', '-')} | "
            f"{c.get('peak_rss_mb', '-')} | {c.get('peak_anon_mb', '-')} | "
            f"{_phase(r, 'load')} | {_phase(r, 'prepare')} | {_phase(r, 'split')} | {_phase(r, 'save')} | "
            f"{_verify_cell(r, 'blocks')} | {_verify_cell(r, 'full')} | {r.get('cache', '?')} |"
        )
    if ar_rows:
        lines += [
            "",
            "## mha2sha build-ar",
            "",
            "`mha2sha build-ar model.onnx --ar N,M -o out --no-verify` + `sync`: one graph per AR, the weights",
            "written once into one shared `.data` (kernel copy), measured like convert above. Rewrite = trace",
            "and rewrite of every variant (graph only); save = the shared weights file + the graphs.",
            "",
            "| model | code | --ar | weights GB | cp s | build-ar s | x cp | peak RSS MB | peak anon MB "
            "| rewrite s | save s | output GB | cache |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in ar_rows:
            c = r.get("convert", {})
            rewrite = sum(sec for key, (sec, _) in r.get("phases", {}).items() if "rewrite" in key)
            exit_note = "" if c.get("exit") == 0 else f" (exit {c.get('exit')})"
            lines.append(
                f"| {r['model']} | {r['tag']} | {r['build_ar']['ars']} | {r['weight_gb']} | {r['cp']['seconds']:.1f} | "
                f"{c.get('seconds', 0):.1f}{exit_note} | {r.get('ratio_vs_cp', '-')} | {c.get('peak_rss_mb', '-')} | "
                f"{c.get('peak_anon_mb', '-')} | {rewrite:.1f} | {_phase(r, 'save')} | {r.get('output_gb', '-')} | "
                f"{r.get('cache', '?')} |"
            )
    text = "\n".join(lines) + "\n"
    RESULTS_MD.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="model folder names under --dir (e.g. llama2-7b-hf-fp16)")
    p.add_argument("--dir", required=True, help="folder holding generated models")
    p.add_argument(
        "--generate", action="store_true", help="generate missing models (name = shape[-Nl]-style-dtype)"
    )
    p.add_argument("--delete", action="store_true", help="delete each generated model after its run")
    p.add_argument("--verify", action="append", default=[], choices=["blocks", "full"])
    p.add_argument("--keep-output", action="store_true")
    p.add_argument("--variant", default="current", help="see variants.py (measure a change before making it)")
    p.add_argument("--tag", help="label of this code version in the table (default: the variant)")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold", help="page cache before each run")
    p.add_argument("--table", action="store_true", help="only rewrite RESULTS.md")
    p.add_argument(
        "--build-ar",
        metavar="N[,M]",
        help="measure `mha2sha build-ar --ar N[,M] --no-verify` (one shared weights file) instead of convert",
    )
    p.add_argument(
        "--quantized",
        action="store_true",
        help="convert with synthetic encodings, --target htp and verification on (the whole job)",
    )
    args = p.parse_args(argv)
    if args.table:
        print(write_table())
        return 0
    base = Path(args.dir)
    for name in args.models:
        folder = base / name
        if not (folder / "meta.json").exists():
            if not args.generate:
                print(f"missing {folder}; pass --generate", file=sys.stderr)
                return 2
            _generate(name, base)
        row = bench_model(
            folder,
            verify=args.verify,
            keep_output=args.keep_output,
            tag=(args.tag or args.variant) + ("+q" if args.quantized else "")
            + (f"+ar{args.build_ar}" if args.build_ar else ""),
            variant=args.variant,
            cache=args.cache,
            quantized=args.quantized,
            build_ar=args.build_ar,
        )
        _save_row(row)
        print(json.dumps(row, indent=1), flush=True)
        if args.delete:
            shutil.rmtree(folder, ignore_errors=True)
    print(write_table())
    return 0


def _generate(name: str, base: Path) -> None:
    """``llama2-7b-hf-fp16`` / ``llama2-7b-2l-hf-fp32`` -> generate.py arguments."""
    head, style, dtype = name.rsplit("-", 2)
    layers = None
    if head.rsplit("-", 1)[-1].endswith("l") and head.rsplit("-", 1)[-1][:-1].isdigit():
        head, cut = head.rsplit("-", 1)
        layers = int(cut[:-1])
    cmd = [
        sys.executable,
        str(HERE / "generate.py"),
        head,
        "-o",
        str(base),
        "--style",
        style,
        "--dtype",
        dtype,
    ]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
