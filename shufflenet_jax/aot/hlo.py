"""What a compiled step runs, read from its optimized HLO through XLA's module objects
(`jaxlib._hlo`: computations, instructions, opcodes, operands): the kernels, their fusion
kinds, library calls and collectives, and the bytes the kernels read and write.

An instruction's attributes (fusion kind, called computation, custom-call target) and result
type are not exposed as fields by these objects; they are read from that one instruction's
text.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

import jax
import numpy as np
from jax._src.lib import _jax
from jaxlib import _hlo

# Instructions that launch no kernel and move no data: names, views, bookkeeping, and the
# second halves of asynchronous pairs (their start is counted).
_FREE = {
    "kParameter", "kConstant", "kTuple", "kGetTupleElement", "kBitcast", "kAfterAll",
    "kAddDependency", "kOptimizationBarrier", "kPartitionId", "kReplicaId", "kAsyncDone",
    "kAsyncUpdate", "kCopyDone", "kAllReduceDone", "kAllGatherDone",
    "kCollectivePermuteDone", "kSendDone", "kRecvDone", "kDomain",
}  # fmt: skip
_FOLLOWED = {"kCall", "kWhile", "kConditional", "kAsyncStart"}  # run their computations
_COLLECTIVES = {
    "kAllReduce", "kAllReduceStart", "kAllGather", "kAllGatherStart", "kReduceScatter",
    "kAllToAll", "kCollectivePermute", "kCollectivePermuteStart", "kRaggedAllToAll",
}  # fmt: skip
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_FUSION_BACKEND = re.compile(r'"fusion_backend_config":\{[^{}]*?"kind":"([^"]+)"')
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\)")  # a TPU layout's memory space other than HBM (VMEM, ...)
_DMA = {"kCopyStart"}  # TPU: transfers between memory spaces, not kernels
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
PROJECT_KERNEL_PREFIX = "shufflenet_"  # the FFI targets of shufflenet_jax's C++ kernels


def _opcode(ins: Any) -> str:
    return str(ins.opcode).rsplit(".", 1)[-1]


def opcode_name(opcode: str) -> str:
    """`kCopyStart` -> `copy-start`, as HLO text spells it."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", opcode[1:]).lower()


def _result_type(text: str) -> str:
    """`%x = bf16[8,16]{1,0} fusion(...)` -> `bf16[8,16]{1,0}` (a tuple's whole parentheses)."""
    rhs = text.split("=", 1)[1].lstrip()
    if not rhs.startswith("("):
        return rhs.split(" ", 1)[0]
    depth = 0
    for i, ch in enumerate(rhs):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return rhs[: i + 1]
    return rhs


def type_bytes(type_text: str, device_memory_only: bool = True) -> int:
    """Bytes of every array in an HLO type (`f32[2,3]{1,0}` or a tuple of them); by default
    only those in device memory (a TPU layout's on-chip memory spaces are left out)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if device_memory_only and _ON_CHIP.search(layout):
            continue
        size = _DTYPE_BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
        total += size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


def _called(text: str) -> list[str]:
    names = _CALLED.findall(text)
    for group in _BRANCHES.findall(text):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def _attr(text: str, name: str) -> str | None:
    m = re.search(rf'\b{name}=("?)%?([^",\s}}]+)\1', text)
    return m.group(2) if m else None


@dataclasses.dataclass
class Kernels:
    """The kernels one compiled step launches per device and what they move."""

    fusions: dict[str, int]  # fusion kind (kLoop, kInput, kOutput, kCustom) -> count
    library_calls: dict[str, int]  # custom-call target or kCustom fusion backend -> count
    unfused: dict[str, int]  # opcode -> count, kernels outside fusions and libraries
    collectives: dict[str, dict[str, int]]  # opcode -> {"count", "bytes"}
    project_kernels: int  # custom calls of this project's C++ kernels
    launches: int  # kernels launched per step: fusions, library calls, unfused operations
    hbm_bytes: int  # sum over kernels of operand and result bytes: an estimate of HBM traffic


def module(hlo_text: str) -> Any:
    """XLA's HloModule of an HLO text."""
    return _hlo.hlo_module_from_text(hlo_text)


def optimized(compiled: Any) -> Any:
    """XLA's HloModule of a compiled step, as the compiler left it (its text does not always
    parse back: XLA's printer writes attributes its parser refuses)."""
    (mod,) = compiled.runtime_executable().hlo_modules()
    return mod


def xla_cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's own cost analysis of a compiled program (CPU, TPU); empty where the compiler
    gives none (GPUs)."""
    cost = compiled.cost_analysis() or {}
    return dict(cost[0] if isinstance(cost, list) else cost)


def _kernel_computations(mod: Any) -> list[Any]:
    """The entry computation and those it runs as control flow (calls, loops, conditionals,
    asynchronous wrappers); not fusion bodies or reducers."""
    by_name = {c.name: c for c in mod.computations()}
    referenced = {
        n for c in by_name.values() for i in c.instructions() for n in _called(i.to_string())
    }
    todo = [c for name, c in by_name.items() if name not in referenced]  # the entry
    seen, out = set(), []
    while todo:
        comp = todo.pop()
        if comp.name in seen:
            continue
        seen.add(comp.name)
        out.append(comp)
        for ins in comp.instructions():
            if _opcode(ins) in _FOLLOWED:
                todo += [by_name[n] for n in _called(ins.to_string()) if n in by_name]
    return out


def kernels(mod: Any) -> Kernels:
    """Counts and bytes of the kernels in an optimized HLO module (see `Kernels`)."""
    fusions, library, unfused = Counter(), Counter(), Counter()
    project, moved, launches = 0, 0, 0
    for comp in _kernel_computations(mod):
        for ins in comp.instructions():
            op = _opcode(ins)
            if op in _FREE or op in _FOLLOWED:
                continue
            text = ins.to_string()
            launches += op not in _DMA
            moved += type_bytes(_result_type(text))
            moved += sum(type_bytes(_result_type(o.to_string())) for o in ins.operands())
            if op == "kFusion":
                kind = _attr(text, "kind") or "?"
                fusions[kind] += 1
                backend = _FUSION_BACKEND.search(text)
                if kind == "kCustom" and backend:  # a Triton or cuDNN kernel XLA generated
                    library[backend.group(1)] += 1
            elif op == "kCustomCall":
                target = _attr(text, "custom_call_target") or "?"
                library[target] += 1
                project += target.startswith(PROJECT_KERNEL_PREFIX)
            elif op not in _COLLECTIVES:
                unfused[opcode_name(op)] += 1
    return Kernels(
        fusions=dict(fusions),
        library_calls=dict(library),
        unfused=dict(unfused),
        collectives=collectives(mod),
        project_kernels=project,
        launches=launches,
        hbm_bytes=moved,
    )


def fusion_bodies(mod: Any) -> list[tuple[str, Counter]]:
    """For every fusion the module launches, its kind and the opcodes its body computes,
    fusions nested in it included (parameters aside): what each kernel fused together."""
    by_name = {c.name: c for c in mod.computations()}

    def body_ops(name: str) -> Counter:
        ops = Counter()
        for i in by_name[name].instructions():
            op = _opcode(i)
            if op == "kFusion":
                ops += body_ops(_attr(i.to_string(), "calls"))
            elif op != "kParameter":
                ops[opcode_name(op)] += 1
        return ops

    out = []
    for comp in _kernel_computations(mod):
        for ins in comp.instructions():
            if _opcode(ins) == "kFusion":
                text = ins.to_string()
                out.append((_attr(text, "kind") or "?", body_ops(_attr(text, "calls"))))
    return out


def collectives(mod: Any) -> dict[str, dict[str, int]]:
    """Every collective in the module, fused or not: opcode -> count and result bytes (an
    asynchronous `all-reduce-start` counts as the `all-reduce` it starts)."""
    out: dict[str, dict[str, int]] = {}
    for comp in mod.computations():
        for ins in comp.instructions():
            op = _opcode(ins)
            if op in _COLLECTIVES:
                name = opcode_name(op).removesuffix("-start")
                entry = out.setdefault(name, {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += type_bytes(_result_type(ins.to_string()), False)
    return out


def flops(lowered: Any) -> float:
    """XLA's cost analysis of the step's unoptimized (global, target-independent) HLO: the
    floating-point operations one step computes over all devices. Run by the CPU client,
    since a deviceless target has none."""
    mod = module(lowered.as_text(dialect="hlo"))
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, mod)
    return float(cost.get("flops", 0.0))


def _dtypes(type_text: str) -> list[str]:
    return [dtype for dtype, _, _ in _ARRAY.findall(type_text)]


def precision(mod: Any) -> dict[str, Counter]:
    """Where a step's precision is decided, over every computation (fusion bodies included):
    the operand and result types of its dots and convolutions (`"bf16,bf16->f32": n`), and the
    accumulator type of its sums (reductions whose reducer adds: `{"f32": n}`)."""
    by_name = {c.name: c for c in mod.computations()}
    adds = {n for n, c in by_name.items() if any(_opcode(i) == "kAdd" for i in c.instructions())}
    out = {"dot": Counter(), "convolution": Counter(), "sum": Counter()}
    for comp in by_name.values():
        for ins in comp.instructions():
            op, text = _opcode(ins), ins.to_string()
            if op in ("kDot", "kConvolution"):
                operands = [_dtypes(_result_type(o.to_string()))[0] for o in ins.operands()]
                result = ",".join(_dtypes(_result_type(text)))
                out[opcode_name(op)][f"{','.join(operands)}->{result}"] += 1
            elif op == "kReduce" and _attr(text, "to_apply") in adds:
                out["sum"].update(_dtypes(_result_type(text)))
    return out


def result_dtypes(mod: Any) -> Counter:
    """How many instructions, over every computation, give a result of each element type."""
    out = Counter()
    for comp in mod.computations():
        for ins in comp.instructions():
            out.update(set(_dtypes(_result_type(ins.to_string()))))
    return out
