"""The library's import graph runs one way: no module imports one that imports it back, not even
through an import inside a function (issue 14). Read from the source with ``ast``, so the test
needs no imports of its own."""

import ast
import os

PACKAGE = "mim4dd_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file in the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))
                dotted = rel[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
                out[dotted] = os.path.join(folder, name)
    return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (functions included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            # "from pkg import name": name is a submodule, or a name defined in pkg.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            # "import a.b.c" imports a, a.b and a.b.c; the package itself holds no code of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and target != PACKAGE:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_import_graph_has_no_cycle():
    graph = import_graph()
    assert "mim4dd_jax.config" in graph and "mim4dd_jax.distill" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_imports_none_of_the_modules_that_use_it():
    graph = import_graph()
    users = {m for m, deps in graph.items() if "mim4dd_jax.config" in deps}
    assert users  # coreset, experts and distill read configs through config's helpers
    assert not graph["mim4dd_jax.config"] & users


def test_the_checker_finds_a_lazy_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_mi_package_layers_import_one_way():
    """options -> bounds -> critics -> selection -> loss: each layer imports only lower ones."""
    order = ["options", "bounds", "critics", "selection", "loss"]
    graph = import_graph()
    for i, name in enumerate(order):
        inside = {d for d in graph[f"{PACKAGE}.mi.{name}"] if d.startswith(f"{PACKAGE}.mi")}
        assert inside <= {f"{PACKAGE}.mi.{lower}" for lower in order[:i]}, (name, inside)
    # conditional (CMIDD's term) stands beside loss, on the layers below it.
    inside = {d for d in graph[f"{PACKAGE}.mi.conditional"] if d.startswith(f"{PACKAGE}.mi")}
    assert inside <= {f"{PACKAGE}.mi.{lower}" for lower in order[:-1]}, inside
    assert f"{PACKAGE}.mi.loss" in graph[f"{PACKAGE}.mi"]  # the package re-exports the layers


def test_the_method_registry_sits_on_the_bottom_floor():
    # state and config read the records; the registry must not reach back into the step code.
    assert import_graph()["mim4dd_jax.methods"] <= {"mim4dd_jax.errors"}


def test_no_module_outgrows_one_concept():
    # 600 lines at most (issue 27): a module that grows past it holds two concepts.
    sizes = {}
    for module, path in _modules().items():
        with open(path) as f:
            sizes[module] = sum(1 for _ in f)
    big = {m: n for m, n in sizes.items() if n > 600}
    assert not big, big


def _field_reads(attr: str, parent: str) -> list[str]:
    """``module:function`` of every ``<x>.<parent>.<attr>`` in the package's code."""
    found = []
    for module, path in _modules().items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == attr
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == parent
                ):
                    found.append(f"{module}:{func.name}")
    return found


def test_mi_weight_is_read_in_one_place():
    # Everything else asks state.mi_weight (issue 27): one check, one meaning of 0.
    assert sorted(set(_field_reads("weight", "mi"))) == ["mim4dd_jax.state:mi_weight"]
