"""The package's shape: no import cycles, no public name shadowed by a submodule."""

import ast
from pathlib import Path

import buildllm

PACKAGE = Path(buildllm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body, functions included (a lazy
    import inside a function still makes the two modules depend on each other)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from buildllm.data import sources` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    for name, deps in graph.items():
        # Importing a.b.c runs a/__init__ and a/b/__init__ first; those edges are not a design choice.
        deps.discard(name)
        deps -= {p for p in modules if name.startswith(p + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_public_name_is_also_a_submodule_name():
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not set(buildllm.__all__) & submodules


PUBLIC_NAMES_AFTER_USE = r"""
import importlib, inspect, sys, tempfile, types
import buildllm

# Use the package the way the README does, so every submodule gets imported ...
out = tempfile.mkdtemp()
result = buildllm.train(buildllm.TrainConfig(data=sys.argv[1], preset="nano", tokenizer="gpt2", max_steps=2,
                                             batch_size=2, context_length=16, eval_interval=2, eval_iters=1,
                                             sample_tokens=0, progress=False, device="cpu", out=out,
                                             compile=False))
model, tokenizer = buildllm.load_model(out)
buildllm.quantize(model, "int8")
buildllm.generate(model, [tokenizer.encode("the")], 3)
buildllm.load_pretrained(out)

# ... then every public name must still be the object its module defines, never a module.
for name in buildllm.__all__:
    value = getattr(buildllm, name)
    home = importlib.import_module("buildllm." + buildllm._EXPORTS[name])
    assert not isinstance(value, types.ModuleType), f"buildllm.{name} is a module"
    assert value is getattr(home, name), f"buildllm.{name} is not {home.__name__}.{name}"
print("ok", len(buildllm.__all__))
"""


def test_public_names_survive_every_submodule_import(tmp_path):
    """A submodule import binds its name on the package; a public function of the same name would
    then turn into the module (``buildllm.quantize(model)``: 'module' object is not callable)."""
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    done = subprocess.run([sys.executable, "-c", PUBLIC_NAMES_AFTER_USE, str(text)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # the text is prepared into ./data/prepared
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
