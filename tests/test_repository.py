"""The code base's own rules: no import cycles, no use of another module's private helpers, no
pointers to documents a user cannot open."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("facedis", "data_prep", "sweeps", "launch", "benchmarks", "tests")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(mods: dict[str, Path]):
    """``{module: set of repository modules it imports}`` and the private names it takes."""
    graph, private = {m: set() for m in mods}, []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in mods:
                        graph[m].add(full)
                    elif node.module in mods:
                        graph[m].add(node.module)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append(f"{m}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph, private


def test_no_import_cycles():
    mods = _modules()
    graph, _ = _imports(mods)
    lib = {m for m in mods if not m.startswith(("tests", "benchmarks"))}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u] & lib):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for m in sorted(lib):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_no_module_uses_another_modules_private_helpers():
    _, private = _imports(_modules())
    assert not private, private


def test_no_references_to_documents_outside_the_repository():
    pattern = re.compile(r"method-spec|infra-recipes|\bspec §|GitHub issue|\bissue #\d|\(#\d+\)")
    hits = []
    for p in [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("facedis/configs/**/*.yaml"),
              *(q for pkg in PACKAGES for q in (REPO / pkg).rglob("*.py") if q.name != "test_repository.py"),
              *(REPO / "benchmarks").glob("*.md")]:
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_docs_links_to_method_sections_exist():
    method = (REPO / "docs" / "method.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip("# ").lower()).replace(" ", "-")
               for h in method.splitlines() if h.startswith("#")}
    missing = []
    for p in [*REPO.glob("*.md"), *REPO.glob("docs/*.md")]:
        for anchor in re.findall(r"method\.md#([a-z0-9-]+)", p.read_text()):
            if anchor not in anchors:
                missing.append(f"{p.name}: #{anchor}")
    assert not missing, missing
