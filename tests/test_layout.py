"""The code base's shape: the package's modules import each other without cycles, and every
command the CLI lists has its own module, a description and help on every option."""
import ast
import importlib.util
import pkgutil
from pathlib import Path

import minisft
import minisft.backends
from minisft.cli import COMMANDS, build_parser

PACKAGE = Path(minisft.__file__).parent


def package_modules() -> dict:
    """{module name: source path} for minisft and minisft.backends (installed from backends/)."""
    modules = {}
    for root, prefix in ((PACKAGE, "minisft"), (Path(minisft.backends.__file__).parent, "minisft.backends")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            modules[".".join([prefix] + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return modules


def import_graph() -> dict:
    """{module: the package modules it imports at module level} (imports inside functions run later
    and cannot form an import-time cycle). `from . import x` depends on submodule x, not on the package."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module
                subs = {f"{base}.{a.name}" for a in node.names}
                deps |= subs if subs <= set(modules) else {base}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict) -> list | None:
    """One import cycle as a list of modules (first == last), or None."""
    state, trail = {}, []

    def visit(node):
        state[node] = "open"
        trail.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return trail[trail.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        trail.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"minisft.model", "minisft.pretrained", "minisft.backends.numpy_backend"} <= set(graph)
    assert "minisft.pretrained" in graph["minisft.model"]  # the edge that once closed a cycle
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_command_has_its_own_module_a_description_and_help_on_every_option():
    assert set(COMMANDS) <= {m.name for m in pkgutil.iter_modules([str(PACKAGE / "cli")])}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS
    for name, parser in sub.choices.items():
        assert parser.description, f"minisft {name} has no description"
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"minisft {name} {action.option_strings[0]} has no help text"


def private_names(tree: ast.Module) -> set:
    """The private names (one leading underscore) a module defines: functions, classes, methods,
    module and class attributes, and the attributes its methods set on self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reaches_into_another_modules_private_names():
    """A private name is its module's own: another module imports it or reads it off an object only
    through a public name (self and cls stay free within their class)."""
    modules = package_modules()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    defined = {name: private_names(tree) for name, tree in trees.items()}
    leaks = []
    for name, tree in trees.items():
        others = set().union(*(d for m, d in defined.items() if m != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                leaks += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if a.name in others]
            elif isinstance(node, ast.Attribute) and node.attr in others and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                leaks.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    assert leaks == []
