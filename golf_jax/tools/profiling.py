"""Where a program's GPU time goes: device traces (jax.profiler, perfetto
format) summarised per kernel and per category, collective overlap per device,
and each kernel tied to the optimised HLO: the model source lines of its ops
and the bytes it moves. Used by `python -m golf_jax.tools.bench --sections profile`.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

# HBM bandwidth of an H100 SXM5 80GB (datasheet): the floor of a memory-bound kernel.
H100_HBM_GBPS = 3350.0


# Kernel-name patterns of a device trace, first match wins (XLA on an H100:
# cuBLAS/CUTLASS GEMMs, cuDNN flash attention, XLA's own fused kernels).
KERNEL_CATEGORIES = (
    ("triton mlp", ("up_act_kernel", "down_grad_kernel")),  # kernels/mlp_triton.py
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "sm90_", "sm80_")),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter")),
    ("memcpy", ("memcpy", "memset")),
    ("xla fusion", ("fusion", "loop_", "input_", "wrapped_", "triton", "reduce", "convert", "transpose",
                    "copy", "scatter", "gather", "select", "dynamic")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def trace_spans(trace_path: Path) -> tuple[dict, list[dict]]:
    """(track names by pid, the timed events of the device tracks), from a
    perfetto trace; the host's tracks when there is no device track (the CPU
    backend records no kernels)."""
    with gzip.open(trace_path, "rt") as f:
        raw = json.load(f)
    events = raw["traceEvents"] if isinstance(raw, dict) else raw
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    pids = device or set(procs)
    return {p: procs[p] for p in pids}, [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]


def summarize_trace(trace_path: Path, repeats: int, top: int = 25) -> dict:
    """Device time per kernel and per category, per repeat, from a perfetto
    trace of `repeats` calls. Device tracks when there are any (GPU), else the
    host's (the CPU backend records no kernels; the plumbing still runs)."""
    tracks, spans = trace_spans(trace_path)
    per_kernel: dict[str, list] = {}
    hlo_ops: dict[str, str] = {}  # kernel -> the HLO instruction that launched it, when the trace says
    for e in spans:
        k = per_kernel.setdefault(e["name"], [0.0, 0])
        k[0] += e["dur"] / 1e3 / repeats  # microseconds -> ms per repeat
        k[1] += 1
        op = (e.get("args") or {}).get("hlo_op")
        if op:
            hlo_ops.setdefault(e["name"], str(op))
    busy = sum(v[0] for v in per_kernel.values())
    overlap = collective_overlap(spans, repeats)
    categories: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {"tracks": sorted(tracks.values()), "busy_ms": busy, "collectives": overlap,
            "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n[:160], "ms": ms, "calls": c // repeats, "category": kernel_category(n),
                     "hlo_op": hlo_ops.get(n, "")} for n, (ms, c) in ranked[:top]],
            "kernels": {n: [ms, c // repeats] for n, (ms, c) in ranked}}


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def collective_overlap(spans: list[dict], repeats: int) -> dict:
    """Per device: ms per repeat during which a collective kernel (NCCL) runs,
    and how much of that time a compute kernel runs beside it on the same
    device (other streams). Hidden communication overlaps; exposed does not."""
    per_device: dict = {}
    for pid in sorted({e["pid"] for e in spans}):
        mine = [e for e in spans if e["pid"] == pid]
        comm = _merged([(e["ts"], e["ts"] + e["dur"]) for e in mine if kernel_category(e["name"]) == "collective"])
        if not comm:
            continue
        compute = _merged([(e["ts"], e["ts"] + e["dur"]) for e in mine
                           if kernel_category(e["name"]) not in ("collective", "memcpy")])
        total = sum(b - a for a, b in comm)
        hidden, j = 0.0, 0
        for a, b in comm:  # both lists sorted and disjoint: one sweep
            while j < len(compute) and compute[j][1] <= a:
                j += 1
            k = j
            while k < len(compute) and compute[k][0] < b:
                hidden += min(b, compute[k][1]) - max(a, compute[k][0])
                k += 1
        per_device[pid] = {"collective_ms": total / 1e3 / repeats, "overlapped_ms": hidden / 1e3 / repeats}
    return per_device


_METADATA = re.compile(r'metadata=\{([^}]*)\}')
_META_FIELD = re.compile(r'(op_name|source_file|source_line|stack_frame_id)=("(?:[^"\\]|\\.)*"|\d+)')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')
_TABLE_FIELD = re.compile(r'(\w+)=(\d+)')


def kernel_key(name: str) -> str:
    """HLO instruction and kernel names compared with every non-alphanumeric
    character as "_" (XLA names a fusion's kernel after it that way)."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def _stack_frames(lines: list[str], depth: int) -> dict[str, str]:
    """The module's stack-frame tables (FileNames, FunctionNames, FileLocations,
    StackFrames) as {frame id: "function:line<caller:line<..."}, innermost first."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        row = _TABLE_ROW.match(line) if current is not None else None
        if row:
            current[row.group(1)] = row.group(2)
        elif current is not None and line.strip():
            current = None
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locations = {k: dict(_TABLE_FIELD.findall(v)) for k, v in tables.get("FileLocations", {}).items()}
    frames = {k: dict(_TABLE_FIELD.findall(v)) for k, v in tables.get("StackFrames", {}).items()}

    def render(frame_id: str) -> str:
        parts, seen = [], set()
        while frame_id in frames and frame_id not in seen and len(parts) < depth:
            seen.add(frame_id)
            loc = locations.get(frames[frame_id].get("file_location_id", ""), {})
            part = f"{functions.get(loc.get('function_name_id', ''), '?')}:{loc.get('line', '?')}"
            if not parts or parts[-1] != part:
                parts.append(part)
            frame_id = frames[frame_id].get("parent_frame_id", "")  # a root frame is its own parent
        return "<".join(parts)

    return {k: render(k) for k in frames}


def hlo_sources(hlo_text: str, top: int = 3, depth: int = 3) -> dict[str, str]:
    """For each instruction of an optimised HLO module (a fusion with the ops
    it calls): where in the model code its ops come from, as "op @
    function:line<caller:line; ...", the most frequent first."""
    lines = hlo_text.splitlines()
    frames = _stack_frames(lines, depth)

    def source(line: str):
        m = _METADATA.search(line)
        if not m:
            return None
        fields = {k: v.strip('"') for k, v in _META_FIELD.findall(m.group(1))}
        op = fields.get("op_name", "").rsplit("/", 1)[-1]
        if fields.get("stack_frame_id") in frames:
            where = frames[fields["stack_frame_id"]]
        elif "source_line" in fields:
            where = f"{Path(fields.get('source_file', '?')).name}:{fields['source_line']}"
        else:
            return op or None
        return f"{op} @ {where}"

    per_computation: dict[str, list] = {}
    calls: dict[str, tuple[str | None, str | None]] = {}
    current = None
    for line in lines:
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{", 1)[0]:
            current = per_computation.setdefault(head.group(1), [])
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        src = source(line)
        if current is not None and src:
            current.append(src)
        called = _CALLS.search(line)
        calls[inst.group(1)] = (called.group(1) if called else None, src)
    out = {}
    for name, (callee, src) in calls.items():
        found = list(per_computation.get(callee, [])) if callee else []
        if src:
            found.append(src)
        if found:
            out[kernel_key(name)] = "; ".join(s for s, _ in collections.Counter(found).most_common(top))
    return out


_ARRAY_TYPE = re.compile(r'\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]')
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OPERANDS = re.compile(r'fusion\((.*?)\), kind=')
_RESULT_TYPE = re.compile(r'=\s*(.*?)\s+[\w\-]+\(')  # "= TYPE opcode(": TYPE may be a tuple "(...)"


def _type_bytes(type_text: str) -> int:
    return sum(_DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dt, dims in _ARRAY_TYPE.findall(type_text))


def hlo_fusion_bytes(hlo_text: str) -> dict[str, int]:
    """For each fusion of an optimised HLO module: the bytes of its operands
    and results, i.e. what it moves through memory if it reads each operand
    once (an upper bound for fusions that read slices of an operand, a lower
    one for those that read an operand twice)."""
    result_type: dict[str, str] = {}
    fusions: dict[str, tuple[str, list[str]]] = {}
    for line in hlo_text.splitlines():
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        result = _RESULT_TYPE.search(line)
        head = result.group(1) if result else ""
        result_type[inst.group(1)] = head
        ops = _OPERANDS.search(line)
        if ops:
            fusions[inst.group(1)] = (head, re.findall(r'%([\w.\-]+)', ops.group(1)))
    return {kernel_key(name): _type_bytes(head) + sum(_type_bytes(result_type.get(o, "")) for o in operands)
            for name, (head, operands) in fusions.items()}


def fusion_traffic(kernels: dict[str, list], fusion_bytes: dict[str, int], hbm_gbps: float = H100_HBM_GBPS) -> dict:
    """The XLA fusions' time against the bytes they move: achieved bandwidth,
    and what they would take at the HBM rate `hbm_gbps` (their floor).

    kernels: {kernel name: [ms per repeat, calls per repeat]}. XLA compiles
    identical fusions once and names the kernel after the first of them, so a
    kernel called n times moves n times its first fusion's bytes."""
    matched = {k: (ms, fusion_bytes[kernel_key(k)] * calls) for k, (ms, calls) in kernels.items()
               if kernel_category(k) == "xla fusion" and kernel_key(k) in fusion_bytes}
    ms = sum(v[0] for v in matched.values())
    gb = sum(v[1] for v in matched.values()) / 1e9
    above_floor = lambda kv: kv[1][0] - kv[1][1] / (hbm_gbps * 1e6)  # noqa: E731  ms lost to the bandwidth
    return {"fusions": len(matched), "ms": ms, "gbytes": gb, "achieved_gbps": gb / ms * 1e3 if ms else None,
            "unmatched_ms": sum(v[0] for k, v in kernels.items()
                                if kernel_category(k) == "xla fusion" and kernel_key(k) not in fusion_bytes),
            "hbm_gbps": hbm_gbps, "floor_ms": gb / hbm_gbps * 1e3,
            "slowest": [{"kernel": k, "ms": v[0], "mbytes": v[1] / 1e6, "gbps": v[1] / v[0] / 1e6 if v[0] else None}
                        for k, v in sorted(matched.items(), key=above_floor, reverse=True)[:12]]}


def profile_call(fn: Callable, out_dir: Path, repeats: int = 3, hlo_text: str | None = None) -> dict:
    """Trace `repeats` calls of an already compiled fn (jax.profiler, perfetto
    format) and summarise its device kernels; the trace stays in out_dir for
    Perfetto or TensorBoard. With the optimised HLO of fn's program, each top
    kernel gets the model source lines of its ops."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(repeats):
            jax.block_until_ready(fn())
    wall_ms = (time.perf_counter() - t0) * 1e3 / repeats
    trace = max(out_dir.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    summary = summarize_trace(trace, repeats)
    summary.update(wall_ms=wall_ms, trace=str(trace))
    if hlo_text:
        sources = hlo_sources(hlo_text)
        for k in summary["top"]:
            # A fusion's kernel is named after it; a library call (cuBLAS,
            # cuDNN, Triton) after the library's kernel, so its HLO op instead.
            k["source"] = sources.get(kernel_key(k["kernel"])) or sources.get(kernel_key(k.get("hlo_op") or ""), "")
    return summary
