"""The import rules of causalscan (``make lint``; ``--graph`` prints the layers).

Rooms are the folders of engine/ (``model``, ``data``, ``patching``, ...), its top-level modules
(``errors``, ``memplan``, ...), ``kernels``, ``bindings``, the public API (``engine/__init__.py``) and
``python -m causalscan`` (``engine/__main__.py``).

1. engine/ reaches the kernels through ``causalscan.bindings`` only: never ``triton``, never
   ``causalscan.kernels``.
2. A folder says in its ``__init__`` what its modules may import from other rooms: a line
   ``May import: base, model.`` (``base`` and ``services`` are the top-level modules named in
   ``BASE`` and ``SERVICES``; ``any room`` allows every room); a top-level module imports as ``TOP`` says.
3. No cycle between rooms, imports inside functions included: every arrow points down a layer.

Exit 1 naming every file and line that breaks a rule (``--root DIR``: check another tree).
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else Path(__file__).parent.parent).resolve()
ENGINE = ROOT / "engine"
BASE = ("errors", "progress", "files", "versions")
SERVICES = ("executor", "checkpoint", "memplan", "results", "report")
TOP = {  # top-level modules of engine/: the rooms each may import
    "errors": (),
    "versions": (),
    "progress": ("errors",),
    "files": ("errors",),
    "executor": BASE,
    "checkpoint": BASE,
    "memplan": (*BASE, "model"),
    "results": (*BASE, "report"),
}
CHECK = Path(__file__).name
# rooms outside engine/ and their folders (triton_src/, not kernels/: transformers depends on a
# package named ``kernels``, which a kernels/ folder would shadow wherever the repo root is on sys.path)
FOLDERS = {"kernels": "triton_src", "bindings": "bindings"}
TRITON = re.compile(r"^\s*(import triton|from triton|from causalscan\.kernels|import causalscan\.kernels)")


def room_of(path: Path) -> str:
    """The room a source file belongs to."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] in FOLDERS.values():
        return next(room for room, folder in FOLDERS.items() if folder == rel.parts[0])
    parts = path.relative_to(ENGINE).parts
    if len(parts) > 1:
        return parts[0]
    return {"__init__.py": "api", "__main__.py": "main"}.get(parts[0], parts[0].removesuffix(".py"))


def rooms() -> set[str]:
    names = {p.stem for p in ENGINE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    folders = {p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()}
    return names | folders | {"kernels", "bindings", "api", "main"}


def targets(tree: ast.AST, known: set[str]):
    """``(line, room)`` of every causalscan import in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [(node.module, a.name) for a in node.names]
        else:
            continue
        for mod, name in mods:
            parts = mod.split(".")
            if parts[0] != "causalscan":
                continue
            if len(parts) > 1:
                yield node.lineno, parts[1]
            else:  # import causalscan / from causalscan import x: a room's name, or the public API
                yield node.lineno, name if name in known else "api"


def allowed(room: str) -> set[str] | None:
    """What ``room`` may import (None: any room), from ``TOP`` or its folder's ``May import:`` line."""
    if room in ("api", "main"):
        return None
    if room in TOP:
        return set(TOP[room])
    init = (ROOT / FOLDERS[room] if room in FOLDERS else ENGINE / room) / "__init__.py"
    if not init.is_file():
        sys.exit(f"engine/{room}.py: a top-level module with no rule: add what it may import to TOP in {CHECK}")
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    found = re.search(r"May import: ([^\n]*)", doc)
    if found is None:
        sys.exit(f"{init.relative_to(ROOT)}: its docstring says nothing of what the folder may import ('May import:')")
    words = [w.strip() for w in found.group(1).rstrip(".").split(",")]
    if words == ["any room"]:
        return None
    groups = {"base": set(BASE), "services": set(SERVICES)}
    return set().union(*(groups.get(w, {w}) for w in words if not w.startswith("nothing")))


def main() -> int:
    known = rooms()
    files = sorted([*ENGINE.rglob("*.py"), *(p for f in FOLDERS.values() for p in (ROOT / f).rglob("*.py"))])
    errors, edges = [], {}
    rules = {r: allowed(r) for r in known}
    for path in files:
        text, room = path.read_text(), room_of(path)
        where = path.relative_to(ROOT)
        if where.parts[0] == "engine":
            errors += [
                f"{where}:{i}: {line.strip()}  (engine/ reaches kernels through causalscan.bindings only)"
                for i, line in enumerate(text.splitlines(), start=1)
                if TRITON.match(line)
            ]
        for line, target in targets(ast.parse(text), known):
            if target == room:
                continue
            edges.setdefault(room, {}).setdefault(target, f"{where}:{line}")
            ok = rules[room]
            if ok is not None and target not in ok:
                errors.append(
                    f"{where}:{line}: {room} imports {target}, which its rule does not allow "
                    f"({', '.join(sorted(ok)) or 'nothing'})"
                )
    cycle = find_cycle(edges)
    if cycle:
        errors.append(
            "a cycle between rooms: "
            + " -> ".join(cycle)
            + " (first arrows: "
            + ", ".join(edges[a][b] for a, b in zip(cycle, cycle[1:], strict=False))
            + ")"
        )
    if "--graph" in sys.argv:
        for layer, names in enumerate(layers(known, edges)):
            print(f"{layer}: " + ", ".join(f"{n} -> {', '.join(sorted(edges.get(n, {}))) or '-'}" for n in names))
    if errors:
        print("\n".join(errors))
        return 1
    return 0


def find_cycle(edges: dict) -> list[str] | None:
    """A cycle of the room graph as a path ``a -> ... -> a``, or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layers(known: set[str], edges: dict) -> list[list[str]]:
    """The rooms in layers, bottom up: each room one layer above the highest it imports."""
    depth: dict[str, int] = {}

    def d(n):
        if n not in depth:
            depth[n] = 0
            depth[n] = 1 + max((d(m) for m in edges.get(n, {})), default=-1)
        return depth[n]

    for n in known:
        d(n)
    return [sorted(n for n in known if depth[n] == k) for k in range(max(depth.values()) + 1)]


if __name__ == "__main__":
    sys.exit(main())
