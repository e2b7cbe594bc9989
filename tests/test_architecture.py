"""The package's layout, read from its imports: the schedule on the ground, three wings above it that
import only downward (io < models < sampling), nothing above them imported by them, and no cycle
(every import counts, at module level or inside a function)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "ddimctl"
WINGS = ("io", "models", "sampling")
# What each part of the house may import of ddimctl: the ground, and the wings below it.
GROUND = {"ddimctl.errors", "ddimctl.choices", "ddimctl.schedule", "ddimctl.seeds", "ddimctl.threads"}
MAY_IMPORT = {
    "io": ("ddimctl.io",),
    "models": ("ddimctl.io", "ddimctl.models"),
    # the runner sends work to a device (devices.py) and across torchrun's processes (distributed.py)
    "sampling": ("ddimctl.io", "ddimctl.models", "ddimctl.sampling", "ddimctl.devices", "ddimctl.distributed"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The ddimctl modules `path` imports (a name imported from a package counts as its submodule
    when there is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ddimctl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("ddimctl"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in MODULES else source)
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else None


def test_the_wings_exist_and_import_only_downward():
    assert all((PACKAGE / wing / "__init__.py").is_file() for wing in WINGS)
    wrong = []
    for module, targets in GRAPH.items():
        wing = wing_of(module)
        if wing is None:
            continue
        allowed = MAY_IMPORT[wing]
        wrong += [f"{module} -> {t}" for t in targets
                  if t not in GROUND and t != "ddimctl" and not t.startswith(allowed)]
    assert wrong == []


def test_the_ground_imports_no_wing():
    for module in GROUND:
        assert GRAPH[module] <= GROUND, module
    assert GRAPH["ddimctl.schedule"] == set()  # the vocabulary stands on torch alone


def floors() -> dict[str, int]:
    """Each module's floor: one above the highest module it imports (the ground's floor is 0);
    a cycle would recurse forever, and is reported instead."""
    done: dict[str, int] = {}

    def floor(module: str, path: tuple[str, ...]) -> int:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + (module,))}")
        if module not in done:
            below = [floor(t, path + (module,)) for t in GRAPH[module] if t in GRAPH and t != "ddimctl"]
            done[module] = 1 + max(below, default=-1)
        return done[module]

    for module in GRAPH:
        floor(module, ())
    return done


def test_no_import_cycles():
    levels = floors()
    # The command line is the top floor: nothing of the library imports it (the package's own main()
    # and __main__ are the console script's doors to it).
    library = [m for m in GRAPH if not m.startswith("ddimctl.cli") and m not in ("ddimctl", "ddimctl.__main__")]
    assert [m for m in library if any(t.startswith("ddimctl.cli") for t in GRAPH[m])] == []
    assert levels["ddimctl.schedule"] == 0
