"""Compile a config's train and eval steps for an accelerator this machine does not have, and
report what the target's own compiler made of them: memory per device, kernels, library calls,
collectives, and a lower bound on the step time (an estimate, not a measurement).

Nothing is materialized: the steps are lowered from `jax.ShapeDtypeStruct`s sharded over the
target's mesh, as MaxText's train_compile.py does.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from shufflenet_jax.aot import hlo
from shufflenet_jax.aot.targets import Target, make_mesh, usable_bytes
from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import abstract_model
from shufflenet_jax.train import optim, parallel, step
from shufflenet_jax.train.state import abstract_state


@dataclasses.dataclass
class Steps:
    """The config's jitted steps for one mesh, and their abstract arguments at a batch size."""

    config: Any
    mesh: Mesh
    train: Any
    eval: Any

    def train_args(self, global_batch: int) -> tuple:
        state = _on(abstract_state(self.config), parallel.replicated(self.mesh))
        return state, self._batch(global_batch, {"label": jnp.int32})

    def eval_args(self, global_batch: int) -> tuple:
        state = _on(abstract_state(self.config), parallel.replicated(self.mesh))
        params = state.params if state.ema_params is None else state.ema_params
        extra = {"label": jnp.int32, "mask": jnp.bool_, "index": jnp.int32}
        return params, state.batch_stats, self._batch(global_batch, extra)

    def _batch(self, global_batch: int, extra: dict[str, Any]) -> dict[str, Any]:
        parallel.check_batch(global_batch, self.mesh)
        size, data = self.config.data.image_size, parallel.data_sharding(self.mesh)
        batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8)}
        batch |= {k: jax.ShapeDtypeStruct((global_batch,), t) for k, t in extra.items()}
        return _on(batch, data)


def _on(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def steps_on(config: Any, mesh: Mesh, backend: str) -> Steps:
    """train.py's train and eval steps for `config` over `mesh`, with `backend`'s options."""
    model = abstract_model(**model_kwargs(config))
    graphdef, params, _ = split_model(model)
    tx = optim.make_optimizer(config, params)
    train = step.train_step_for(config, graphdef, tx, mesh, backend)
    return Steps(config, mesh, train, step.make_eval_step(graphdef, mesh, backend))


def steps_for(config: Any, target: Target) -> Steps:
    """The steps for `target`'s devices and compiler."""
    return steps_on(config, make_mesh(target), target.backend)


def without_persistent_cache() -> None:
    """Keep deviceless compiles out of JAX's persistent compilation cache: an executable for a
    device this machine lacks cannot be read back from it (reading needs the device's client).
    JAX decides whether to use the cache at a process's first compile: reset that decision."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


def compile_step(jitted: Any, args: tuple) -> tuple[Any, Any, float]:
    """(lowered, compiled, compile seconds)."""
    lowered = jitted.lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - start


def memory(compiled: Any, target: Target) -> dict[str, Any]:
    """Per-device bytes from XLA's memory analysis; donated arguments that alias outputs are
    counted once. A step fits when its total is within what JAX lets programs use there."""
    m, usable = compiled.memory_analysis(), usable_bytes(target)
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "total_bytes": total,
        "device_bytes": target.hbm_bytes,
        "usable_bytes": usable,
        "fits": total <= usable,
    }


def estimate(lowered: Any, kernels: hlo.Kernels, target: Target, global_batch: int) -> dict:
    """The step's time bound on the target: max(HBM bytes / bandwidth, flops / peak) per device,
    from the compiled kernels' operand and result bytes and the program's flops."""
    flops = hlo.flops(lowered) / target.devices
    seconds = max(kernels.hbm_bytes / target.hbm_bytes_per_s, flops / target.peak_bf16_flops)
    return {
        "hbm_bytes": kernels.hbm_bytes,
        "flops": flops,
        "lower_bound_ms": 1e3 * seconds,
        "images_per_s_bound": global_batch / seconds if seconds else None,
        "basis": "estimate: per device, max(HBM bytes / bandwidth, flops / bf16 peak)",
    }


def report(lowered: Any, compiled: Any, seconds: float, target: Target, batch: int) -> dict:
    """Everything `train.py --compile_for` prints and writes for one step."""
    kernels = hlo.kernels(hlo.optimized(compiled))
    out = {
        "compile_s": seconds,
        "memory": memory(compiled, target),
        "fusions": kernels.fusions,
        "library_calls": kernels.library_calls,
        "unfused": kernels.unfused,
        "kernels": kernels.launches,
        "collectives": kernels.collectives,
        "project_kernels": kernels.project_kernels,
        "estimate": estimate(lowered, kernels, target, batch),
    }
    if target.backend == "tpu":
        cost = hlo.xla_cost_analysis(compiled)
        keep = ("flops", "bytes accessed", "optimal_seconds")
        out["xla_cost_analysis"] = {k: float(cost[k]) for k in keep if k in cost}
    return out


def total_bytes(jitted: Any, args_at: Any, per_device: int, target: Target) -> float:
    """The step's per-device memory at `per_device` images per device; infinite when the
    compiler refuses for lack of memory."""
    try:
        _, compiled, _ = compile_step(jitted, args_at(per_device * target.devices))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            return math.inf
        raise
    return memory(compiled, target)["total_bytes"]


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    """The largest per-device batch found to fit, the smallest found not to (None if none was
    tried), the compiles the search took and how many of them the compiler refused (out of
    memory before it finished)."""

    largest: int
    first_over: int | None
    compiles: int
    refused: int = 0


def _next_probe(
    seen: dict[int, float],
    usable: float,
    lo: int,
    hi: int | None,
    bisect: bool,
    refusals_cheap: bool = False,
) -> int:
    """Where a line through the two measured batches nearest the limit reaches `usable`
    (memory grows about linearly with the batch); from one batch, where memory proportional to
    the batch would (an underestimate when part of it does not grow); the bracket's middle when
    the line misses it or `bisect` (the last two probes fell on one side: it is not closing in).
    When the compiler refuses an oversized step much faster than it compiles one that fits (the
    TPU compiler does), close in from above instead: a quarter of the bracket below the
    smallest refused batch, or where a fit would end the search, whichever is lower."""
    step = max(1, lo // 32)
    if refusals_cheap and hi is not None and math.isinf(seen[hi]):
        below = min(math.floor(hi - (hi - lo) / 4), math.ceil(hi * 32 / 33))
        return int(min(max(below, lo + step), hi - 1))
    finite = [(b, m) for b, m in seen.items() if math.isfinite(m)]
    near = sorted(finite, key=lambda bm: abs(bm[1] - usable))[:2]
    guess = None
    if len(near) == 2 and near[0][0] != near[1][0]:
        (b1, m1), (b2, m2) = near
        slope = (m2 - m1) / (b2 - b1)
        if slope > 0:
            guess = b1 + (usable - m1) / slope
    elif hi is None and lo and seen[lo] > 0:
        guess = lo * usable / seen[lo]
    if hi is None:
        guess = 2 * max(lo, 1) if guess is None else min(guess, 64 * max(lo, 1))
    elif bisect or guess is None or not lo < guess < hi:
        guess = (lo + hi) / 2
    top = math.inf if hi is None else hi - step
    return int(min(max(math.floor(guess), lo + step), top))


def _refusals_cheap(seconds: dict[int, float], seen: dict[int, float]) -> bool:
    """Whether every refused compile took under a quarter of the quickest finished one."""
    refused = [s for b, s in seconds.items() if math.isinf(seen[b])]
    finished = [s for b, s in seconds.items() if math.isfinite(seen[b])]
    return bool(refused and finished) and max(refused) < min(finished) / 4


def max_batch(
    jitted: Any,
    args_at: Any,
    start: int,
    target: Target,
    start_bytes: float | None = None,
    max_compiles: int = 10,
    progress: Callable[[str], None] | None = None,
    start_seconds: float | None = None,
) -> BatchSearch:
    """The largest per-device batch whose step fits, to within 1/32 of it: probes `start` and
    then where the measured memory extrapolates to the usable bytes, until the smallest batch
    seen not to fit is within 1/32 above the largest seen to fit. At most `max_compiles`
    finished compiles, and as many again that the compiler refused. `start_bytes` (and
    `start_seconds`), when already known from a compile at `start`, save that compile;
    `progress` hears of each compile. It assumes memory grows with the batch; on the TPUs it
    need not (docs/accelerator.md), and the result is then one such edge, not the last."""
    usable = usable_bytes(target)
    seen = {} if start_bytes is None else {start: start_bytes}
    seconds = {} if start_seconds is None or start_bytes is None else {start: start_seconds}
    compiles, sides = 0, []
    probe = start
    while True:
        if probe not in seen:
            began = time.perf_counter()
            seen[probe] = total_bytes(jitted, args_at, probe, target)
            seconds[probe] = time.perf_counter() - began
            compiles += 1
            if progress:
                fits = "fits" if seen[probe] <= usable else "does not fit"
                progress(
                    f"  search compile {compiles}: {probe} per device, "
                    f"{seen[probe] / 2**30:.2f} GiB, {fits} ({seconds[probe]:.0f} s)"
                )
        sides.append(seen[probe] <= usable)
        lo = max((b for b, m in seen.items() if m <= usable), default=0)
        over = [b for b, m in seen.items() if m > usable]
        hi = min(over) if over else None
        refused = sum(math.isinf(m) for m in seen.values())
        done = hi is not None and hi - lo <= max(1, lo // 32)
        spent = max(compiles - refused, refused) >= max_compiles
        if done or spent or (hi is None and lo >= 1 << 16):
            return BatchSearch(lo, hi, compiles, refused)
        cheap = _refusals_cheap(seconds, seen)
        probe = _next_probe(seen, usable, lo, hi, sides[-2:] in ([True] * 2, [False] * 2), cheap)


def compile_for(
    config: Any,
    target: Target,
    search: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, dict]:
    """(the JSON report of `train.py --compile_for`, the compiled steps): both steps at the
    config's batch sizes and, with `search`, the largest per-device batches that fit.
    `progress` hears of each compile as it ends (a search can take hours on a TPU target)."""
    steps = steps_for(config, target)
    t = config.train
    out: dict[str, Any] = {"target": target.name, "devices": target.devices}
    out["per_device_batch"] = t.batch_size // target.devices
    executables = {}
    for name, jitted, args_at, batch in (
        ("train", steps.train, steps.train_args, t.batch_size),
        ("eval", steps.eval, steps.eval_args, t.eval_batch_size),
    ):
        lowered, compiled, seconds = compile_step(jitted, args_at(batch))
        if progress:
            progress(f"{name} step, global batch {batch}: compiled in {seconds:.0f} s")
        out[name] = report(lowered, compiled, seconds, target, batch)
        out[name]["global_batch"] = batch
        out[name]["max_per_device_batch"] = None
        executables[name] = compiled
        if search:
            found = max_batch(
                jitted,
                args_at,
                batch // target.devices,
                target,
                out[name]["memory"]["total_bytes"],
                progress=progress,
                start_seconds=seconds,
            )
            out[name]["max_per_device_batch"] = found.largest
            out[name]["first_per_device_batch_over"] = found.first_over
            out[name]["max_batch_compiles"] = found.compiles
            out[name]["max_batch_refused"] = found.refused
    return out, executables


def write_executables(path: str | Path, executables: dict[str, Any], devices: int) -> None:
    """The compiled steps, serialized for a machine with the target's `devices` devices
    (`load_executables` there instead of compiling)."""
    from jax.experimental.serialize_executable import serialize

    saved = {"devices": devices, "steps": {k: serialize(c) for k, c in executables.items()}}
    Path(path).write_bytes(pickle.dumps(saved))


def load_executables(path: str | Path) -> dict[str, Any]:
    """The steps `write_executables` saved, loaded onto this machine's first devices."""
    from jax.experimental.serialize_executable import deserialize_and_load

    saved = pickle.loads(Path(path).read_bytes())
    devices = jax.devices()[: saved["devices"]]
    return {
        k: deserialize_and_load(*v, execution_devices=devices) for k, v in saved["steps"].items()
    }


def describe(out: dict[str, Any], target: Target) -> str:
    """The report as lines to print."""
    lines = [f"{target.name}: {target.devices} {target.backend} device(s)"]
    for name in ("train", "eval"):
        r = out[name]
        m, e = r["memory"], r["estimate"]
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines += [
            f"{name} step, global batch {r['global_batch']}: compiled in {r['compile_s']:.1f} s",
            f"  memory per device: arguments {gib(m['argument_bytes'])}, outputs "
            f"{gib(m['output_bytes'])} ({gib(m['alias_bytes'])} donated), temp "
            f"{gib(m['temp_bytes'])}, total {gib(m['total_bytes'])} of "
            f"{gib(m['usable_bytes'])} usable ({gib(m['device_bytes'])} on the device): "
            f"{'fits' if m['fits'] else 'DOES NOT FIT'}",
            f"  kernels per step {r['kernels']}: fusions {r['fusions']}",
            f"  library calls {r['library_calls']}",
            f"  outside fusions and libraries {r['unfused']}",
            f"  collectives {r['collectives']}; this project's C++ kernels: {r['project_kernels']}",
            f"  estimate (not a measurement): {e['hbm_bytes'] / 2**20:.0f} MiB of HBM traffic, "
            f"{e['flops'] / 1e9:.1f} GFLOP per device; at least {e['lower_bound_ms']:.2f} ms "
            f"per step, at most {e['images_per_s_bound']:.0f} images/s",
        ]
        if "xla_cost_analysis" in r:
            lines.append(f"  XLA's cost analysis: {r['xla_cost_analysis']}")
        if r["max_per_device_batch"] is not None:
            over = r["first_per_device_batch_over"]
            lines.append(
                f"  largest per-device batch that fits: {r['max_per_device_batch']} "
                + (f"({over} does not" if over else "(searched no further")
                + f"; {r['max_batch_compiles']} compiles, "
                + f"{r['max_batch_refused']} refused for memory)"
            )
    return "\n".join(lines)
