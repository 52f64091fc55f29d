"""The layout the design promises: no import circles, and each package importing only what it may.

Imports are read from the source (the AST, function-level imports included), not by importing:
a lazy import inside a function closes a circle just as well as one at the top of a module.
"""
import ast
import configparser
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "models", "parallel")


def module_files() -> dict[str, pathlib.Path]:
    """``dotted module name -> file`` for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(path: pathlib.Path, package: str) -> set[str]:
    """Every dotted name ``path`` imports, relative ones resolved.

    ``from a import b`` gives ``a.b`` (a module ``b``, or a name the module ``a`` defines).
    """
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of ours it imports``; ``import a.b`` depends on the module ``a.b``."""
    files = module_files()

    def owner(name):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = {owner(name) for name in imported_names(path, package)}
        graph[module] = {d for d in deps if d and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle_among_trainer_models_and_parallel():
    graph = import_graph()
    assert len(graph) > 60  # every module was read
    assert {"trainer.trainer", "parallel.pipeline._runtime", "models.gpt"} <= set(graph)
    assert cycles(graph) == []


def test_packages_import_only_what_the_design_allows():
    graph = import_graph()
    for module, path in module_files().items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        roots = {name.split(".")[0] for name in imported_names(path, package)}
        if module.startswith("parallel"):
            assert not roots & {"flax", "trainer", "models"}, (module, roots)
        if module.startswith("models"):
            assert not roots & {"parallel", "trainer"}, (module, roots)
    assert all(not d.startswith("trainer") for m, deps in graph.items()
               if not m.startswith("trainer") for d in deps)


def test_setup_installs_only_the_three_packages_and_no_unused_requirement():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    assert {name.split(".")[0] for name in include} == set(PACKAGES)  # not `benchmarks`
    requirements = config["options"]["install_requires"]
    assert "highspy" not in requirements  # HiGHS comes with scipy (scipy.optimize.milp)
