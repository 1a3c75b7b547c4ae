"""The package's import structure: what `import shufflenet_jax` loads, and no import circle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "shufflenet_jax"
HEAVY = ("orbax", "optax", "grain", "tensorflow", "tensorflow_datasets", "torch")

_LOADED = """
import json, sys
from flax import nnx
before = set(sys.modules)
import shufflenet_jax
added = sorted({name.split(".")[0] for name in set(sys.modules) - before})
print(json.dumps({"added": added, "all": sorted({n.split(".")[0] for n in sys.modules})}))
"""


def test_importing_the_package_loads_no_training_checkpoint_input_or_torch_library():
    """`import shufflenet_jax` (the model, `predictor`, the ops) adds JAX's and Flax's own
    modules and chex, never orbax, optax, grain, TensorFlow or torch. Flax's `nnx` itself
    imports optax (its Optimizer), so optax is judged by what the package adds beyond it."""
    out = subprocess.run([sys.executable, "-c", _LOADED], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert not set(HEAVY) & set(loaded["added"]), loaded["added"]
    assert not {"orbax", "grain", "tensorflow", "torch"} & set(loaded["all"]), loaded["all"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (in functions too): `from P
    import name` counts as importing P.name where that is a module, else P."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules, or None (depth-first search; package __init__
    files re-exporting their children are left out: Python loads a child after its parent)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a module importing its own package
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = _import_graph()
    assert len(graph) > 40 and "shufflenet_jax.model.inference" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
