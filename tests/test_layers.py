"""Imports point down the layers only, and there is no import cycle between cxrray's modules.

Layers, bottom up (a module may import its own layer and those below):
  0 data (sources, phantoms, shards, storage, de-identification, streams), runtime, the package root
  1 eval (metrics and statistics on arrays), io.checkpoint (safetensors + JSON files)
  2 families, diffusion (networks, objectives, samplers), the stages' torch-free config sections
    (train.settings, pipelines.settings, serve.settings)
  3 config (composes the sections that live beside their code), io (load_model, export, MLflow pyfunc)
  4 train, pipelines, tracking
  5 serve
  6 cli, demo, reproduce
Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cxrray

ROOT = Path(cxrray.__file__).parent
LAYERS = {  # module prefix -> layer; the longest matching prefix wins
    "cxrray": 0, "cxrray.data": 0, "cxrray.runtime": 0,
    "cxrray.eval": 1, "cxrray.io.checkpoint": 1,
    "cxrray.families": 2, "cxrray.diffusion": 2,
    "cxrray.train.settings": 2, "cxrray.pipelines.settings": 2, "cxrray.serve.settings": 2,
    "cxrray.config": 3, "cxrray.io": 3,
    "cxrray.train": 4, "cxrray.pipelines": 4, "cxrray.tracking": 4,
    "cxrray.serve": 5,
    "cxrray.cli": 6, "cxrray.demo": 6, "cxrray.reproduce": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> set[str]:
    """cxrray modules imported anywhere in the file (absolute and relative imports)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cxrray")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("cxrray"):
                found.add(base)
    return found


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        for target in imports(path):
            if layer(target) > layer(mod):
                upward.append(f"{mod} (layer {layer(mod)}) imports {target} (layer {layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: {t for t in imports(p) if t in files and t != m} for m, p in files.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    # a package __init__ that re-exports its own submodules is not a cycle worth failing on
    real = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not real, "import cycles:\n" + "\n".join(real)
