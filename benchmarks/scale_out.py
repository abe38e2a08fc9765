r"""Communication and step time of global vs per-shard selection on a device mesh.

  python -m benchmarks.scale_out --num_devices=8 --out=benchmarks/results

Runs the real trainer setup (`train.setup_run`) on one device and on a mesh of
``num_devices`` with each selection scope, and writes scale_out_<platform>.json:

* bytes moved per optimizer step, read from the compiled dispatch's HLO: every
  collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) with
  its per-device payload (the larger of its input and output), split into those run once
  per dispatch and those inside the selection loop (run once per chunk); the per-step
  total multiplies the latter by the measured chunks per step;
* the median time per optimizer step over the timed epochs (after a warm-up epoch that
  includes compilation).

On a CPU the devices are host-platform devices (XLA_FLAGS is set below, before JAX
starts): they share the machine's cores, so the times show overheads, not speed-ups.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before JAX is imported; ignored on GPU/TPU, which bring their devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments.configs import digits, fashion_mnist  # noqa: E402
from sb_jax import parallel, train  # noqa: E402

_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the mesh.")
_SCOPES = flags.DEFINE_list("scopes", ["global", "per_shard"], "Selection scopes to measure.")
_SELECTOR = flags.DEFINE_string("selector", "sb", "Selection policy.")
_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "digits"],
                             "Dataset (its experiments/configs file).")
_TRAIN_SUBSET = flags.DEFINE_integer("train_subset", 8192, "Training examples.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Timed epochs, after one warm-up epoch.")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
_MODEL_OPS = flags.DEFINE_enum(
    "model_ops", "auto", ["auto", "cpu", "xla"],
    "config.model_ops. On the CPU 'auto' is 'cpu', whose kernel gradient sums over batch "
    "slices that cross device boundaries (GSPMD moves them: collective-permutes); 'xla' is "
    "what GPUs and TPUs run. Other than 'auto', it is part of the output file's name.",
)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")  # unindented: a computation
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_REFS = re.compile(r"(condition|body|to_apply|calls|true_computation|false_computation)"
                   r"=%?([\w.\-]+)|(branch_computations)=\{([^}]*)\}")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def collective_bytes(hlo: str, num_devices: int) -> dict:
    """Per-device collective payload of a compiled module, by loop nesting depth.

    Returns {"per_dispatch": bytes outside loops, "per_loop_iteration": bytes in a
    while body (depth 1), "deeper": bytes nested further, "ops": [(op, bytes, depth)]}.
    """
    computations, refs, entry, current = {}, {}, None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current], refs[current] = [], []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or line.strip() == "}":
            continue
        op = _OP.search(line)
        if op:
            result = _shape_bytes(op.group(1))
            # A reduce-scatter's input is num_devices times its output.
            payload = result * num_devices if op.group(2) == "reduce-scatter" else result
            computations[current].append((op.group(2), payload))
        for kind, name, branches_kind, branches in _REFS.findall(line):
            kind, names = (kind, name) if kind else (branches_kind, branches)
            for name in names.split(","):
                name = name.strip().lstrip("%")
                if name:
                    refs[current].append((name, kind in ("body", "condition")))
    depth = {entry: 0}
    stack = [entry]
    while stack:
        name = stack.pop()
        for child, is_loop in refs.get(name, []):
            d = depth[name] + (1 if is_loop else 0)
            if child in computations and depth.get(child, 1 << 30) > d:
                depth[child] = d
                stack.append(child)
    ops = [(op, b, depth[c]) for c, items in computations.items() if c in depth
           for op, b in items]
    return {
        "per_dispatch": sum(b for _, b, d in ops if d == 0),
        "per_loop_iteration": sum(b for _, b, d in ops if d == 1),
        "deeper": sum(b for _, b, d in ops if d > 1),
        "ops": sorted(ops, key=lambda o: (o[2], -o[1])),
    }


def measure(num_devices: int, scope: str) -> dict:
    base = fashion_mnist if _DATASET.value == "fashion_mnist" else digits
    config = base.get_config()
    config.selector = _SELECTOR.value
    config.prime_epochs = 0  # every measured step is a selective one
    config.train_subset = _TRAIN_SUBSET.value
    config.num_devices = num_devices
    config.selection_scope = scope
    config.tensorboard = False
    config.model_ops = _MODEL_OPS.value
    run = train.setup_run(config)
    state = run.fresh_state()
    ids, valid, cursor, ep = train.epoch_inputs(run, 0)
    state = state._replace(cursor=cursor)
    compiled = run.fns.train_dispatch.lower(state, run.data, ids, valid, ep).compile()
    comm = collective_bytes(compiled.as_text(), num_devices)
    per_step_ms, chunks_per_step = [], []
    for epoch in range(_EPOCHS.value + 1):
        ids, valid, cursor, ep = train.epoch_inputs(run, epoch)
        state = state._replace(cursor=cursor)
        before = parallel.to_host((state.step, state.counters.examples_seen))
        start = time.perf_counter()
        while True:
            state, done = run.fns.train_dispatch(state, run.data, ids, valid, ep)
            if bool(done):
                break
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        after = parallel.to_host((state.step, state.counters.examples_seen))
        num_steps = int(after[0] - before[0])
        chunks = (after[1] - before[1]) / (run.policy.chunk_size * run.num_shards)
        if epoch > 0:  # epoch 0 includes compilation
            per_step_ms.append(1000.0 * seconds / max(num_steps, 1))
            chunks_per_step.append(float(chunks) / max(num_steps, 1))
    loop_rounds = statistics.mean(chunks_per_step)
    if scope == "per_shard" and num_devices > 1:
        # The selection loop holds no collective: the per-step bytes are per dispatch.
        loop_rounds = 0.0 if comm["per_loop_iteration"] == 0 else loop_rounds
    result = {
        "num_devices": run.num_devices,
        "scope": scope if run.mesh is not None else "single_device",
        "ms_per_step_median": statistics.median(per_step_ms),
        "ms_per_step": per_step_ms,
        "chunks_per_step": statistics.mean(chunks_per_step),
        "bytes_per_dispatch": comm["per_dispatch"],
        "bytes_per_chunk": comm["per_loop_iteration"],
        "bytes_nested_deeper": comm["deeper"],
        "bytes_per_step": comm["per_dispatch"] + comm["per_loop_iteration"] * loop_rounds,
        "collectives": [{"op": o, "bytes": b, "loop_depth": d} for o, b, d in comm["ops"]],
    }
    logging.info("%s", {k: v for k, v in result.items() if k != "collectives"})
    return result


def main(argv):
    del argv
    results = [measure(1, "global")]
    for scope in _SCOPES.value:
        results.append(measure(_NUM_DEVICES.value, scope))
    os.makedirs(_OUT.value, exist_ok=True)
    platform = jax.devices()[0].platform
    suffix = "" if _MODEL_OPS.value == "auto" else f"_{_MODEL_OPS.value}_ops"
    path = os.path.join(_OUT.value, f"scale_out_{platform}{suffix}.json")
    with open(path, "w") as f:
        json.dump({
            "command": "python -m benchmarks.scale_out " + " ".join(sys.argv[1:]),
            "platform": platform, "device_kind": jax.devices()[0].device_kind,
            "selector": _SELECTOR.value, "dataset": _DATASET.value,
            "train_subset": _TRAIN_SUBSET.value, "model_ops": _MODEL_OPS.value,
            "results": results,
        }, f, indent=1)
    print(path)
    for r in results:
        print(f"{r['scope']:>13} x{r['num_devices']}: {r['ms_per_step_median']:8.1f} ms/step, "
              f"{r['bytes_per_step'] / 1024:9.1f} KiB/step ({r['bytes_per_dispatch']} B per "
              f"dispatch + {r['bytes_per_chunk']} B x {r['chunks_per_step']:.2f} chunks)")


if __name__ == "__main__":
    app.run(main)
