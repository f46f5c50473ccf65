"""The layers of the house, checked from the source (parsed with ``ast``, nothing imported).

* no import circle between modules of ``omni_ray/`` (imports inside functions count too);
* ``omni_ray/`` never imports ``deployments``;
* the engines (``omni_ray/ar``, ``omni_ray/dit``) reach Ray (``ray``, ``omni_ray.cluster``) only
  through their executor seams, named in ``RAY_SEAMS``;
* nothing below the ingress (``omni_ray/``, ``deployments/stages/``) imports ``fastapi`` / ``starlette``,
  and the stage deployments do not import the ingress.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("omni_ray", "deployments")

ENGINES = ("omni_ray.ar", "omni_ray.dit")
RAY_SEAMS = {
    "omni_ray.ar.executor.tensor_parallel",     # TPModelRunner: drives a WorkerGroup of Ray ranks
    "omni_ray.dit.parallel.runner",             # build_parallel_runner: the DiT's WorkerGroup
}
WEB = ("fastapi", "starlette")
BELOW_INGRESS = ("omni_ray", "deployments.stages")


# ----------------------------------------------------------------------------- reading the tree
def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` imports, anywhere in it: ``import a.b`` gives ``a.b``;
    ``from a import b`` gives ``a`` and ``a.b`` (b may be a submodule); relative imports resolved."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules of PACKAGES it imports, module -> every dotted name it imports)."""
    files = module_files(root)
    graph, raw = {}, {}
    for mod, f in files.items():
        names = imported_names(f.read_text(), mod, f.name == "__init__.py")
        raw[mod] = names
        graph[mod] = {n for n in names if n in files and n != mod}
    return graph, raw


# ----------------------------------------------------------------------------- the rules
def within(name: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def circles(graph: dict[str, set[str]], prefix: str = "omni_ray") -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)
    among the modules under ``prefix`` (Tarjan)."""
    nodes = [m for m in graph if within(m, prefix)]
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if not within(w, prefix):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for n in nodes:
        if n not in index:
            visit(n)
    return out


def violations(raw: dict[str, set[str]]) -> list[str]:
    """Every import that crosses a layer the wrong way, as 'module -> name (rule)'."""
    bad = []
    for mod, names in sorted(raw.items()):
        for n in sorted(names):
            if within(mod, "omni_ray") and within(n, "deployments"):
                bad.append(f"{mod} -> {n} (omni_ray never imports deployments)")
            if (within(mod, ENGINES) and mod not in RAY_SEAMS
                    and (within(n, "ray") or within(n, "omni_ray.cluster"))):
                bad.append(f"{mod} -> {n} (engines reach Ray only through {sorted(RAY_SEAMS)})")
            if within(mod, BELOW_INGRESS) and within(n, WEB):
                bad.append(f"{mod} -> {n} (only the ingress speaks HTTP)")
            if within(mod, "deployments.stages") and within(n, "deployments.ingress"):
                bad.append(f"{mod} -> {n} (stages sit below the ingress)")
    return bad


# ----------------------------------------------------------------------------- the house
def test_the_tree_is_read():
    graph, _ = import_graph()
    assert {"omni_ray.ar.engine.llm_engine", "omni_ray.cluster.dit_cache", "deployments.app"} <= set(graph)
    assert "omni_ray.ar.engine.scheduler" in graph["omni_ray.ar.engine.llm_engine"]
    for seam in RAY_SEAMS:                        # a seam that moved must be renamed here, not dropped
        assert seam in graph, seam


def test_no_import_circles_in_omni_ray():
    graph, _ = import_graph()
    assert circles(graph) == []


def test_imports_respect_the_layers():
    _, raw = import_graph()
    assert violations(raw) == []


# ----------------------------------------------------------------------------- the checks can fail
def test_a_circle_is_found():
    graph = {"omni_ray.a": {"omni_ray.b"}, "omni_ray.b": {"omni_ray.c"}, "omni_ray.c": {"omni_ray.a"},
             "omni_ray.d": {"omni_ray.a"}, "omni_ray.e": {"omni_ray.e"}, "deployments.x": {"deployments.x"}}
    assert sorted(circles(graph)) == [["omni_ray.a", "omni_ray.b", "omni_ray.c"], ["omni_ray.e"]]


@pytest.mark.parametrize("mod, name", [
    ("omni_ray.runner", "deployments.app"),
    ("omni_ray.ar.engine.llm_engine", "ray"),
    ("omni_ray.dit.engine", "ray.util.placement_group"),
    ("omni_ray.ar.worker.model_runner", "omni_ray.cluster.worker_group"),
    ("omni_ray.metrics", "fastapi"),
    ("deployments.stages.ar", "starlette.requests"),
    ("deployments.stages.dit", "deployments.ingress.ingress"),
])
def test_a_crossing_is_found(mod, name):
    assert len(violations({mod: {name}})) == 1


@pytest.mark.parametrize("mod, name", [
    ("omni_ray.ar.executor.tensor_parallel", "ray"),
    ("omni_ray.cluster.dit_cache", "ray"),
    ("deployments.ingress.ingress", "fastapi"),
    ("deployments.stages.ar", "ray.serve"),
    ("omni_ray.ar.engine.llm_engine", "rayon"),     # a name that only starts like one
])
def test_allowed_imports_pass(mod, name):
    assert violations({mod: {name}}) == []


def test_relative_imports_are_resolved():
    src = "from . import b\nfrom ..c import d\nimport e.f\ndef g():\n    from h import i\n"
    assert imported_names(src, "omni_ray.x.a", False) == {
        "omni_ray.x", "omni_ray.x.b", "omni_ray.c", "omni_ray.c.d", "e.f", "h", "h.i"}
