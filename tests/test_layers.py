"""Imports point down the layers only, every package sits on one layer, methods stay apart, and there is no
import cycle between cxrray's modules.

Layers, bottom up (a module may import its own layer and those below), given per package or root module:
  0 data (sources, phantoms, shards, storage, de-identification, streams), runtime, errors, worker_setup,
    the package root
  1 eval (metrics and statistics on arrays), io (checkpoint files: safetensors + JSON, model cards)
  2 families, diffusion (networks, objectives, samplers)
  3 config (composes the sections that live beside their code), models (load_model, export, MLflow pyfunc)
  4 train, pipelines, tracking
  5 serve, benchmarks and attribute (several methods side by side)
  6 cli, demo
A package's `settings` module (its torch-free config section, composed by `config`) sits at layer 2 if its
package is higher: the one named exception. Inside `pipelines`, each method is a subpackage
(`METHODS`); a method may import the shared modules beside it, never another method, and the shared
modules import no method. Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cxrray

ROOT = Path(cxrray.__file__).parent
LAYERS = {  # package or root module -> layer; the longest matching prefix wins
    "cxrray": 0, "cxrray.data": 0, "cxrray.runtime": 0, "cxrray.errors": 0, "cxrray.worker_setup": 0,
    "cxrray.eval": 1, "cxrray.io": 1,
    "cxrray.families": 2, "cxrray.diffusion": 2,
    "cxrray.config": 3, "cxrray.models": 3,
    "cxrray.train": 4, "cxrray.pipelines": 4, "cxrray.tracking": 4,
    "cxrray.serve": 5, "cxrray.benchmarks": 5, "cxrray.attribute": 5,
    "cxrray.cli": 6, "cxrray.demo": 6,
}
SETTINGS_LAYER = 2
METHODS = ("diffchest", "cohorts", "cheff", "saliency", "attribution", "daug")  # subpackages of cxrray.pipelines, one per paper


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    if module.endswith(".settings"):
        return min(LAYERS[best], SETTINGS_LAYER)
    return LAYERS[best]


def method(module: str) -> str | None:
    """The pipelines method a module belongs to, "" for pipelines' shared modules, None outside pipelines."""
    parts = module.split(".")
    if parts[:2] != ["cxrray", "pipelines"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in METHODS else ""


def test_layers_are_given_per_package_and_every_root_module_is_placed():
    """A layer belongs to a whole package: no submodule of a package gets its own (so a package cannot
    straddle two layers), and no root module falls to layer 0 by omission."""
    for name in LAYERS:
        target = ROOT.parent.joinpath(*name.split("."))
        assert target.is_dir() or (name.count(".") == 1 and target.with_suffix(".py").is_file()), \
            f"{name}: a layer is given to a package or a root module, not to a module inside a package"
    root_modules = {f"cxrray.{p.stem}" for p in ROOT.glob("*.py") if p.stem != "__init__"}
    root_packages = {f"cxrray.{p.name}" for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert not (root_modules | root_packages) - set(LAYERS), "not placed on a layer"
    methods = {p.name for p in (ROOT / "pipelines").iterdir() if (p / "__init__.py").is_file()}
    assert methods == set(METHODS), "every pipelines subpackage is a method (and listed)"


def test_methods_do_not_import_each_other_and_shared_modules_import_no_method():
    crossing = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        mod = module_name(path)
        for target in imports(path):
            if method(target) and method(target) != method(mod):
                crossing.append(f"{mod} imports {target}")
    assert not crossing, "imports across methods (move what both need into cxrray/pipelines/):\n" + "\n".join(crossing)


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
                # `from cxrray.pipelines import diffchest`: the imported name may itself be a module
                found |= {f"{base}.{a.name}" for a in node.names
                          if (ROOT.parent.joinpath(*f"{base}.{a.name}".split(".")).with_suffix(".py")).is_file()
                          or (ROOT.parent.joinpath(*f"{base}.{a.name}".split(".")) / "__init__.py").is_file()}
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
