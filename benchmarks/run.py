"""Time and memory of ``mha2sha convert`` on full-size models against a ``cp`` of the same files.

The default job -- what a user runs: verification on, encodings when they have them -- for every row
of the table in benchmarks/RESULTS.md, with the ``cp`` reference next to each, in one command::

    python benchmarks/run.py --dir /tmp/bench --suite default --generate --delete --max-load 1.2

``--suite default`` = :data:`SUITE` (models generated on demand, deleted after their rows with
``--delete``). A ``--job`` row is ``--repeat`` (cp, job) pairs, one after the other, and keeps the
median of each (default: 3 pairs below :data:`REPEAT_BELOW_GB` of weights, where this disk's noise
is as large as the whole job; 1 above). Each row waits until the 1-minute load average is below
``--max-load`` (other jobs on the machine distort timings) and records the load it started at.

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
``--job "ARGS"`` (repeatable; ``{E}`` = the synthetic encodings) measures ``mha2sha convert <model>
-o <out> ARGS`` as given, e.g. ``--job "" --job "--target htp" --job "--encodings {E}"``: the
default-job rows. Their peak RSS is the whole process's (verification threads included), each phase
with its own peak (``MHA2SHA_PHASE_PEAKS=1``).

Cold cache = ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each measured command, then
``--settle`` seconds of waiting (default :data:`SETTLE_S`) so that every command starts from the same
memory state (needs root; without it the run is marked "warm" and cp goes first so both see the
same cache state). Why the wait: on a VM whose balloon driver reports free pages to the host (this
one: ``virtio_balloon``, ``page_reporting_order`` 9), the gigabytes that ``drop_caches`` frees are
handed back to the host about 2 s later, and a page touched after that is faulted in by the host
again: a kernel copy of the Qwen2.5-1.5B folder's 3.5 GB took 7.2 s right after ``drop_caches``,
10.4 s 2 s after, 13.2-14.4 s 5-10 s after (sys time 5.0 -> 11.4-12.7 s; the copy is the same). A
command started right after the drop copies into memory still backed, one started later does not:
``cp`` got the first and the converter, whose save starts ~2.5 s in, the second. A real run starts
from memory that has been idle (the settled case) for both.

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
from generate import parse_dir_name

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"

#: The default-job table (issue 12): model folder -> jobs (extra ``convert`` arguments; ``{E}`` is
#: the model's synthetic encodings). Prepared steps with the KV cache of a 4096-token context.
SUITE: dict[str, list[str]] = {
    # Qualcomm-prepared Qwen2.5-1.5B-shaped part (projections already Conv 1x1, fp32, AR 32): 5 full
    # layers without embedding / LM head = 0.94 GB (28 layers with their MLPs would be 5.2 GB)
    "qwen2.5-1.5b-5l-part-ar32-prepared-conv-fp32": ["--encodings {E}"],
    "llama3.2-1b-cl4096-prepared-fp16": [""],
    "qwen2.5-1.5b-cl4096-prepared-fp16": ["", "--encodings {E}"],
    "llama2-7b-cl4096-prepared-fp16": ["", "--target htp", "--encodings {E}", "--encodings {E} --target htp"],
    "llama3-8b-cl4096-prepared-fp16": ["", "--target htp", "--encodings {E}"],
}


# ----------------------------------------------------------------------------- measuring


#: Seconds waited after dropping the page cache before a measured command (``--settle``): freed
#: memory goes back to the host ~2 s after it is freed (see the module docstring); 10 s is past the
#: point where the copy above stopped getting slower.
SETTLE_S = 10.0
_settle_s = SETTLE_S


def drop_caches() -> bool:
    """Empty the page cache (root only), then wait :data:`SETTLE_S` (or ``--settle``) seconds."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    time.sleep(_settle_s)
    return True


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
        "peak_polled_mb": round(peaks["VmRSS"] / 1024),
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_load(max_load: float | None, timeout: float = 1800) -> float:
    """Sleep until the 1-minute load average is below ``max_load``; returns the load at the start."""
    start = time.monotonic()
    while max_load is not None and load1() >= max_load and time.monotonic() - start < timeout:
        time.sleep(10)
    return load1()


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
        "settle_s": _settle_s,
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


def _encodings_for(model: Path) -> Path:
    encodings = model.with_suffix(".encodings")
    if not encodings.exists():
        encodings.write_text(json.dumps(synthetic_encodings(model)))
    return encodings


#: Pairs (``cp``, job) measured per default-job row when ``--repeat`` is not given: three below
#: this many GB of weights, where the disk's run-to-run noise (``cp`` of one 3.5 GB folder took
#: 2.8-10 s on one day) is as large as the whole job; one above, where it averages out.
REPEAT_BELOW_GB = 5.0


def bench_job(
    folder: Path, job: str, *, tag: str, max_load: float | None, cache: str = "cold", repeat: int | None = None
) -> dict:
    """``cp`` of the model folder, then ``mha2sha convert <model> -o <out> <job>`` (the default job:
    verification on), both + ``sync`` from the same page-cache state; ``repeat`` such pairs, one
    after the other. The row holds the median of each column (the job's phases and peaks from its
    median run) and every run's seconds."""
    meta = json.loads((folder / "meta.json").read_text())
    model = folder / "model.onnx"
    extra = job.split()
    if "{E}" in job:
        encodings = _encodings_for(model)
        extra = [str(encodings) if a == "{E}" else a for a in extra]
    weight_gb = round(meta["weight_bytes"] / 1e9, 2)
    if repeat is None:
        repeat = 3 if weight_gb < REPEAT_BELOW_GB else 1
    row: dict = {
        "model": folder.name,
        "job": job.replace("{E}", "E") or "(default)",
        "tag": tag,
        "kind": "job",
        **{k: meta.get(k) for k in ("shape", "style", "dtype", "layers", "ar", "context", "part")},
        "weight_gb": weight_gb,
        "repeat": repeat,
        "settle_s": _settle_s,
    }
    cps, runs = [], []
    for _ in range(repeat):
        cp, run = _job_pair(folder, model, extra, max_load, cache)
        cps.append(cp)
        runs.append(run)
    row["cp"] = _median_run(cps, lambda r: r["seconds"])
    row["cache"] = row["cp"]["cache"]
    row["cp_runs"] = [r["seconds"] for r in cps]
    failed = [r for r in runs if r["convert"]["exit"] != 0]
    chosen = failed[0] if failed else _median_run(runs, lambda r: r["convert"]["seconds"])
    row.update(chosen)
    row["convert_runs"] = [r["convert"]["seconds"] for r in runs]
    row["ratio_vs_cp"] = round(row["convert"]["seconds"] / max(row["cp"]["seconds"], 1e-9), 2)
    return row


def _median_run(runs: list[dict], key) -> dict:
    """The run whose ``key`` is the median (the lower middle one of an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


def _job_pair(folder: Path, model: Path, extra: list[str], max_load: float | None, cache: str) -> tuple[dict, dict]:
    """One ``cp`` of the folder and one conversion, each from the same page-cache state."""
    work = Path(tempfile.mkdtemp(prefix="mha2sha-bench-", dir=folder.parent))
    run: dict = {}
    try:
        prepare_cache = drop_caches if cache == "cold" else lambda: _warm(folder)
        load_cp = wait_for_load(max_load)
        state = cache if prepare_cache() is not False else "warm"
        cp = measure(["cp", "-r", str(folder), str(work / "copy")])
        cp["seconds"] = round(cp["seconds"] + _sync_seconds(), 2)
        cp.update(cache=state, load=load_cp)
        shutil.rmtree(work / "copy")

        out = work / "out"
        run["load"] = wait_for_load(max_load)
        prepare_cache()
        cmd = [sys.executable, "-m", "mha2sha.cli", "convert", str(model), "-o", str(out), *extra]
        env = {**os.environ, "MHA2SHA_PHASE_PEAKS": "1"}
        conv = measure(cmd, log=work / "convert.log", env=env)
        conv["seconds"] = round(conv["seconds"] + _sync_seconds(), 2)
        run["load_after"] = load1()
        run["convert"] = conv
        if conv["exit"] != 0:
            conv["log_tail"] = (work / "convert.log").read_text()[-2000:]
        else:
            report = json.loads((out / "model.report.json").read_text())
            run["phases"] = {
                p["name"]: [round(p["seconds"], 2), round(p.get("phase_peak_rss_mb") or p["peak_rss_mb"])]
                for p in report["phases"]
            }
            # VmHWM restarts per phase (MHA2SHA_PHASE_PEAKS): the process peak is the timer's
            conv["peak_rss_mb"] = max(
                conv["peak_polled_mb"], round(max(p["peak_rss_mb"] for p in report["phases"]))
            )
            v = report.get("verification") or {}
            run["verify"] = {
                "mode": v.get("mode"),
                "proven": v.get("proven"),
                "ok": v.get("ok"),
                "qdq_max_lsb": max((report.get("quantized_max_lsb") or {0: None}).values(), default=None),
                "workers": v.get("block_workers"),
                "notes": v.get("notes", []),
            }
            run["output_gb"] = round(folder_bytes(out) / 1e9, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cp, run


# ----------------------------------------------------------------------------- table


def _load_results() -> list[dict]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []


def _key(row: dict) -> tuple:
    return (row["model"], row["tag"], row.get("cache"), row.get("job"))


def _save_row(row: dict) -> None:
    key = _key(row)
    rows = [r for r in _load_results() if _key(r) != key]
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


def _job_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## The default job (verification on)",
        "",
        "`python benchmarks/run.py --dir D --suite default --generate --delete --max-load 1.2` (one",
        "command: models generated, each row measured, models deleted). Prepared steps from",
        "`benchmarks/generate.py` (AR 128, CL 4096 unless the name says otherwise, batch 1, one external",
        "data file; `-part` = no embedding / LM head, `prepared-conv` = projections already Conv 1x1 on",
        "`[1, C, 1, AR]`), synthetic AIMET 1.0.0 W8A16 encodings (`E`) from `benchmarks/encodings_gen.py`.",
        "Job = `mha2sha convert M -o out <job>`: verification `auto` (block by block at these sizes: float,",
        "and with `E` quantized (QDQ) block pairs), timed + `sync`, from a cold page cache (`drop_caches`, then",
        f"{SETTLE_S:g} s of settling: freed memory goes back to this VM's host ~2 s after, see `run.py`);",
        f"`cp` = `cp -r` of the same model folder + `sync`, the same way, right before. Rows under {REPEAT_BELOW_GB:g} GB of weights",
        "are measured as 3 such pairs one after the other (this disk's noise is as large as those jobs),",
        "larger ones once: `cp s` and `ours s` are medians, `x cp` their ratio, `runs` every run's",
        "seconds (cp / ours). Peak RSS = the whole process of the median run (verification runs in its",
        "threads), phases with the peak inside each (`s / MB`). Load = 1-minute load average when the",
        "conversion started (rows wait for < 1.2); 2 cores, 24 GB.",
        "",
        "`settle s` = the wait after `drop_caches` (`--settle`); rows with 0 were measured the earlier way",
        "(each command right after the drop) and are kept to show what that does to `cp`.",
        "",
        "| model | weights GB | job | settle s | cp s | ours s | x cp | runs (cp / ours) | peak RSS MB | proven | load | phases (s / MB) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---|---:|---|",
    ]
    short = {
        "load": "load",
        "prepare (fold shapes, infer)": "prepare",
        "split heads": "split",
        "propagate encodings": "encodings",
        "HTP layout (Linear -> Conv 1x1)": "layout",
        "find blocks (original sides computed during the save)": "find blocks",
        "save": "save",
        "verify blocks, float and QDQ (onnxruntime)": "verify",
        "verify blocks (onnxruntime)": "verify",
        "verify (onnxruntime)": "verify",
    }
    for r in sorted(rows, key=lambda r: (r["weight_gb"], r["model"], r["job"], -r.get("settle_s", 0))):
        c = r.get("convert", {})
        exit_note = "" if c.get("exit") == 0 else f" (exit {c.get('exit')})"
        phases = ", ".join(
            f"{short.get(k, k)} {sec:.1f}/{mb}" for k, (sec, mb) in r.get("phases", {}).items() if sec >= 0.05
        )
        v = r.get("verify") or {}
        proven = (v.get("proven") or "-").replace("quantized (QDQ)", "QDQ").replace("block by block", "blocks")
        if v.get("qdq_max_lsb") is not None:
            proven += f" ({v['qdq_max_lsb']:g} LSB)"
        runs = " / ".join(
            ", ".join(f"{x:.1f}" for x in r.get(k, [])) or "-" for k in ("cp_runs", "convert_runs")
        )
        lines.append(
            f"| {r['model']} | {r['weight_gb']} | `{r['job']}` | {r.get('settle_s', 0):g} | {r['cp']['seconds']:.1f} | "
            f"{c.get('seconds', 0):.1f}{exit_note} | {r.get('ratio_vs_cp', '-')} | {runs} | {c.get('peak_rss_mb', '-')} | "
            f"{proven} | {r.get('load', '-')} | {phases} |"
        )
    return lines


def write_table() -> str:
    results = _load_results()
    jobs = [r for r in results if r.get("kind") == "job"]
    rows = sorted(
        [r for r in results if r.get("kind") != "job"],
        key=lambda r: (r["tag"] != "current", r["weight_gb"], r["model"], r["cache"]),
    )
    lines = [
        "# mha2sha convert: time and memory on full-size random-weight models",
        "",
        "Generated by `benchmarks/run.py` from `benchmarks/results.json` (do not edit by hand).",
        "",
        *_job_lines(jobs),
        "",
        "## Conversion alone (`--no-verify`), earlier code",
        "",
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
        "--generate", action="store_true", help="generate missing models (name: see generate.py)"
    )
    p.add_argument("--delete", action="store_true", help="delete each generated model after its run")
    p.add_argument("--suite", choices=["default"], help="every row of the default-job table (SUITE)")
    p.add_argument(
        "--job",
        action="append",
        default=None,
        help='measure "mha2sha convert M -o out JOB" (verification on; {E} = synthetic encodings)',
    )
    p.add_argument("--max-load", type=float, help="wait until the 1-minute load average is below this")
    p.add_argument(
        "--repeat",
        type=int,
        help=f"(cp, job) pairs per --job row, medians kept (default: 3 below {REPEAT_BELOW_GB:g} GB of weights, else 1)",
    )
    p.add_argument("--verify", action="append", default=[], choices=["blocks", "full"])
    p.add_argument("--keep-output", action="store_true")
    p.add_argument("--variant", default="current", help="see variants.py (measure a change before making it)")
    p.add_argument("--tag", help="label of this code version in the table (default: the variant)")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold", help="page cache before each run")
    p.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help=f"seconds waited after dropping the page cache, before each command (default {SETTLE_S:g}; see above)",
    )
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
    global _settle_s
    _settle_s = args.settle
    if args.table:
        print(write_table())
        return 0
    base = Path(args.dir)
    plan: list[tuple[str, list[str] | None]] = [(m, args.job) for m in args.models]
    if args.suite:
        plan += [(m, jobs) for m, jobs in SUITE.items() if not args.models or m in args.models]
        plan = [(m, j) for m, j in plan if j is not None]
    for name, jobs in plan:
        folder = base / name
        if not (folder / "meta.json").exists():
            if not args.generate:
                print(f"missing {folder}; pass --generate", file=sys.stderr)
                return 2
            _generate(name, base)
        if jobs is not None:
            for job in jobs:
                row = bench_job(
                    folder, job, tag=args.tag or "current", max_load=args.max_load, cache=args.cache,
                    repeat=args.repeat,
                )  # fmt: skip
                _save_row(row)
                print(json.dumps(row, indent=1), flush=True)
        else:
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
    """A model folder name (``llama2-7b-cl4096-prepared-fp16``, ...) -> generate.py arguments."""
    kw = parse_dir_name(name)
    cmd = [sys.executable, str(HERE / "generate.py"), kw["shape_name"], "-o", str(base)]
    cmd += ["--style", kw["style"], "--dtype", kw["dtype"]]
    for key, flag in (("layers", "--layers"), ("ar", "--ar"), ("context", "--context")):
        if key in kw:
            cmd += [flag, str(kw[key])]
    if kw.get("part"):
        cmd.append("--part")
    if kw.get("lora_rank"):
        cmd += ["--lora-rank", str(kw["lora_rank"])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
