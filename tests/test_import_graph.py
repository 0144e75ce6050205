"""Import-graph contracts, read from the source with ``ast`` (nothing is imported).

Layers, lowest first. A module may import modules of its own layer and of the layers below it, never above.
Every import counts: at module level, inside functions (lazy) and under ``TYPE_CHECKING``.

0. foundation      errors, atomic_files, registry, config, determinism, environment, progress, solver, timing, metrics,
                   weighted_metrics, resampling, stats, allocator (glibc malloc tuning), and the ``retbench.protocols``
                   package itself (the registry of protocol names, whose protocols load lazily by name; the protocols
                   proper are layer 4)
1. spec and data   spec/, tasks, preprocess, data/, weights, text_tokenizers, text_towers, local_model_format
2. adapters        adapters (and any retbench/adapters*.py), model_adapters/ (installed as retbench.model_adapters)
3. features, store features (image features, cached), pixel_cache (preprocessed pixels), gpu_decode
                   (nvjpeg), store (the result store), finetune/ (the training machinery of the fine-tuning
                   protocols)
4. protocols       protocols/* (zero-shot, few-shot, linear probe, retrieval, VQA)
5. runner          runner
6. front ends      leaderboard/, cli/, sweep/, pretrain/, and the ``retbench`` package (its lazy ``evaluate``/``run``)

A module in no layer fails :func:`test_every_module_has_a_layer`: place it in :data:`LAYERS` (and in the list above).

Other contracts: the adapters import neither ``retbench.protocols`` nor ``retbench.runner``; ``retbench/data`` has
no import cycle; no module of retbench, the adapters or the benchmarks imports a private (``_name``) name or module
of another retbench module (a package's own ``_private`` modules are for that package; tests may test them); the
adapters are imported as ``retbench.model_adapters`` only; no module uses pyplot or switches matplotlib's backend.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("retbench.errors", "retbench.atomic_files", "retbench.registry", "retbench.config",
                    "retbench.determinism", "retbench.environment", "retbench.progress", "retbench.solver", "retbench.timing",
                    "retbench.metrics", "retbench.weighted_metrics", "retbench.resampling", "retbench.stats",
                    "retbench.allocator", "retbench.protocols")),
    ("spec and data", ("retbench.spec", "retbench.spec.*", "retbench.tasks", "retbench.preprocess", "retbench.data",
                       "retbench.data.*", "retbench.weights", "retbench.text_tokenizers", "retbench.text_towers",
                       "retbench.local_model_format")),
    ("adapters", ("retbench.adapters*", "retbench.model_adapters", "retbench.model_adapters.*")),
    ("features, store", ("retbench.features", "retbench.pixel_cache", "retbench.gpu_decode", "retbench.store",
                         "retbench.finetune", "retbench.finetune.*")),
    ("protocols", ("retbench.protocols.*",)),
    ("runner", ("retbench.runner",)),
    ("front ends", ("retbench", "retbench.__main__", "retbench.leaderboard", "retbench.leaderboard.*", "retbench.cli",
                    "retbench.cli.*", "retbench.sweep", "retbench.sweep.*", "retbench.pretrain", "retbench.pretrain.*")),
]
"""(layer, module patterns), lowest first; a module takes the layer of its longest matching pattern."""

ADAPTER_LAYER = "adapters"
FORBIDDEN_FOR_ADAPTERS = ("retbench.protocols", "retbench.runner")


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the module imported (a submodule when ``from package import submodule``)
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    line: int
    file: Path
    type_only: bool = False  # under ``if TYPE_CHECKING:``: for annotations, never loaded at run time

    def __str__(self) -> str:
        what = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.file.relative_to(REPO)}:{self.line}: {self.importer} imports {self.target}{what}"


def _module_files() -> dict[str, Path]:
    """Module name → file, for retbench/, model_adapters/ (as retbench.model_adapters) and benchmarks/."""
    files: dict[str, Path] = {}
    for folder, prefix in (("retbench", "retbench"), ("model_adapters", "retbench.model_adapters"),
                           ("benchmarks", "benchmarks")):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


MODULES = _module_files()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _imports(module: str, path: Path) -> list[Import]:
    """Every import of a retbench module by ``module`` (any depth of the file)."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name == "model_adapters" or name.startswith("model_adapters."):
                    name = f"retbench.{name}"  # checked by its own contract; placed where it would resolve
                if name == "retbench" or name.startswith("retbench."):
                    out.append(Import(module, name, (), node.lineno, path, id(node) in guarded))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "model_adapters" or source.startswith("model_adapters."):
                source = f"retbench.{source}"
            if source != "retbench" and not source.startswith("retbench."):
                continue
            plain = [a.name for a in node.names if f"{source}.{a.name}" not in MODULES]
            for a in node.names:  # ``from package import submodule`` depends on the submodule
                if f"{source}.{a.name}" in MODULES:
                    out.append(Import(module, f"{source}.{a.name}", (), node.lineno, path, id(node) in guarded))
            if plain:
                out.append(Import(module, source, tuple(plain), node.lineno, path, id(node) in guarded))
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (pattern length, layer index)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), index)
    return None if best is None else best[1]


def _package_modules() -> list[str]:
    return [m for m in MODULES if not m.startswith("benchmarks")]


def _adapter_modules() -> list[str]:
    index = [name for name, _ in LAYERS].index(ADAPTER_LAYER)
    return [m for m in _package_modules() if _layer(m) == index]


def _adapter_violations() -> list[Import]:
    return [imp for m in _adapter_modules() for imp in GRAPH[m]
            if any(imp.target == f or imp.target.startswith(f + ".") for f in FORBIDDEN_FOR_ADAPTERS)]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _package_modules() if _layer(m) is None]
    assert not missing, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {missing}"


def test_lower_layers_never_import_higher_ones() -> None:
    """No module loads a module of a higher layer (imports under ``if TYPE_CHECKING:`` only name types in
    annotations and are not counted here; the adapter and data/ contracts count them too)."""
    names = [name for name, _ in LAYERS]
    upward = []
    for module in _package_modules():
        low = _layer(module)
        for imp in GRAPH[module]:
            high = _layer(imp.target)
            if low is not None and high is not None and high > low and not imp.type_only:
                upward.append(f"{imp}: layer '{names[low]}' imports layer '{names[high]}'")
    assert not upward, "\n".join(upward)


def test_adapters_import_neither_protocols_nor_runner() -> None:
    violations = [str(imp) for imp in _adapter_violations()]
    assert not violations, "\n".join(violations)


def test_data_has_no_import_cycle() -> None:
    data = {m for m in MODULES if m.startswith("retbench.data.")}
    edges = {m: sorted({imp.target for imp in GRAPH[m] if imp.target in data and imp.target != m}) for m in data}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [module, target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(data):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles in retbench/data: " + "; ".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_cross_modules() -> None:
    """``from retbench.x import _y`` (a function, class or constant) is never taken from another module, and a
    ``_private`` module is imported only from inside its own package."""
    crossing = []
    for module in MODULES:
        for imp in GRAPH[module]:
            if imp.target != module and any(_private(n) for n in imp.names):
                crossing.append(str(imp))
            parts = imp.target.split(".")
            for i, part in enumerate(parts):
                if _private(part) and not module.startswith(".".join(parts[:i]) + "."):
                    crossing.append(f"{imp} (a private module of {'.'.join(parts[:i])})")
    assert not crossing, "\n".join(crossing)


def test_adapters_are_imported_under_retbench_only() -> None:
    """The model_adapters/ folder installs as retbench.model_adapters; a top-level import would load it twice."""
    found = []
    for folder in ("retbench", "model_adapters", "tests", "benchmarks", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                          if n == "model_adapters" or n.startswith("model_adapters.")]
    assert not found, "\n".join(found)


def test_no_pyplot_and_no_backend_switch() -> None:
    """Figures through matplotlib's object-oriented API: a caller's (a notebook's) backend and pyplot state stay."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [f"{module}:{node.lineno}: import {a.name}" for a in node.names if a.name == "matplotlib.pyplot"]
            elif isinstance(node, ast.ImportFrom) and node.module in ("matplotlib", "matplotlib.pyplot"):
                if node.module == "matplotlib.pyplot" or any(a.name == "pyplot" for a in node.names):
                    found.append(f"{module}:{node.lineno}: pyplot")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("matplotlib", "mpl"):
                found.append(f"{module}:{node.lineno}: matplotlib.use()")
    assert not found, "\n".join(found)


def test_the_graph_sees_what_it_checks() -> None:
    """Guard against a parser that silently sees nothing: known edges, lazy and TYPE_CHECKING ones included."""
    targets = {m: {imp.target for imp in GRAPH[m]} for m in GRAPH}
    assert "retbench.data.reading" in targets["retbench.data.sources"]
    assert "retbench.data.dedup" in targets["retbench.data.splits"]  # a lazy import inside a function
    assert "retbench.leaderboard.plots" in targets["retbench.leaderboard.figures"]  # from package import submodule
    assert "retbench.spec" in targets["retbench.adapters"]  # under TYPE_CHECKING
    assert "retbench.cli.common" in targets["retbench.pretrain.cli"]
    assert len(MODULES) > 80 and "retbench.model_adapters.clip" in MODULES
