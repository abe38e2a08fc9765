"""Where a jitted function's time goes: device time per compiled operation.

    rows = profile_by_op(jitted_fn, *args)
    print(format_profile(rows, top=15))

Runs the function under `jax.profiler.trace` (Perfetto JSON output, no TensorBoard
needed), sums the duration of every executed HLO instruction, and names each by the
jax operation it came from (the `op_name` metadata of the optimized HLO), so that
"fusion.19" reads as ".../conv_1/conv_general_dilated" and the transposed (backward)
operations are told apart from the forward ones.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class OpTime(NamedTuple):
    """Device time of one compiled instruction, per call of the profiled function."""

    hlo_name: str
    jax_op: str
    ms_per_call: float
    share: float


def _jax_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the jax operation it came from.

    Instructions XLA created without metadata (the pieces of a rewritten
    select_and_scatter, layout copies) are named by their HLO name and result shape.
    """
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, _ = match.groups()
        op_name = _OP_NAME.search(line)
        label = _short(op_name.group(1)) if op_name else f"[no jax op] {name} {shape}"
        names.setdefault(name, label)
    return names


def _short(op_name: str) -> str:
    # "jit(step)/transpose(jvp(SmallCNN))/conv_1/..." -> "backward SmallCNN/conv_1/...".
    op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    backward = "transpose(" in op_name
    op_name = re.sub(r"(transpose|jvp|jit|vmap)\(([^()]*)\)", r"\2", op_name)
    op_name = re.sub(r"(transpose|jvp|jit|vmap)\(([^()]*)\)", r"\2", op_name)
    return ("backward " if backward else "") + op_name


def profile_by_op(fn: Callable[..., Any], *args: Any, calls: int = 5) -> list[OpTime]:
    """Profiles `calls` warm calls of the jitted `fn(*args)`; rows sorted by time.

    Raises:
      ValueError: `fn` is not jitted (has no `lower`) or `calls` < 1.
    """
    if not hasattr(fn, "lower"):
        raise ValueError("profile_by_op needs a jax.jit-wrapped function.")
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}.")
    names = _jax_op_names(fn.lower(*args).compile().as_text())
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {trace_dir}.")
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    micros: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            micros[event["name"]] += float(event.get("dur", 0.0))
    total = sum(micros.values()) or 1.0
    return [
        OpTime(name, names[name], us / calls / 1e3, us / total)
        for name, us in micros.most_common()
    ]


def group_by_jax_op(rows: Sequence[OpTime]) -> list[tuple[str, float]]:
    """Milliseconds per call summed over instructions from the same jax operation."""
    sums: collections.Counter[str] = collections.Counter()
    for row in rows:
        sums[row.jax_op] += row.ms_per_call
    return sums.most_common()


def format_profile(rows: Sequence[OpTime], top: int = 15) -> str:
    """A plain-text table of the `top` most expensive jax operations."""
    total = sum(row.ms_per_call for row in rows)
    lines = [f"{'ms/call':>8} {'share':>6}  jax operation (total {total:.2f} ms)"]
    for op, ms in group_by_jax_op(rows)[:top]:
        lines.append(f"{ms:8.2f} {ms / total:6.1%}  {op}")
    return "\n".join(lines)
