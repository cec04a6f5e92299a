"""Book infrastructure shared by the runner (tools/run_chapters.py) and the tests:
which chapters exist, what a chapter's code and library dependencies hash to, and whether a
committed notebook is a clean, fresh, top-to-bottom run of the ``book`` profile.

A chapter is stale when the hash of its code cells, or of the library modules it imports
(followed transitively through ``sgdrank``'s own imports), differs from the hash recorded in
its metadata when it was last executed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
LIB = ROOT / "lib" / "sgdrank"
META_KEY = "sgdrank"
REPO_URL = "https://github.com/sgdrank/sgdrank"


def chapter_paths() -> list[Path]:
    """Every chapter notebook, in book order."""
    return sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_cells(nb: dict) -> list[dict]:
    """Code cells that belong to the chapter (papermill's injected-parameters cell excluded)."""
    return [
        c for c in nb["cells"]
        if c["cell_type"] == "code"
        and "injected-parameters" not in c.get("metadata", {}).get("tags", [])
    ]


def mime_records(nb: dict, mime: str) -> list[dict]:
    """The JSON records of MIME type ``mime`` stored in a notebook's outputs, in order (the
    claims of ``sgdrank.report.claim``, the decompositions of ``sgdrank.decomposition.show``)."""
    out = []
    for c in code_cells(nb):
        for o in c.get("outputs", []):
            raw = o.get("data", {}).get(mime)
            if raw is not None:
                out.append(json.loads(raw if isinstance(raw, str) else "".join(raw)))
    return out


def write_or_check(page: Path, text: str, check: bool, regenerate: str) -> int:
    """Write a generated page, or with ``check`` compare it with the file (exit status 1 and a
    message naming ``regenerate``, the command that rewrites it, when it is stale)."""
    import sys

    if check:
        if not page.exists() or page.read_text(encoding="utf-8") != text:
            print(f"{page.name} is stale: run {regenerate}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text, encoding="utf-8")
    print(f"wrote {page.relative_to(ROOT)}")
    return 0


def code_hash(nb: dict) -> str:
    h = hashlib.sha256()
    for c in code_cells(nb):
        h.update(_source(c).encode())
        h.update(b"\0")
    return h.hexdigest()


def _modules_named_in(code: str) -> set[str]:
    """sgdrank submodules a code cell imports or names (``from sgdrank import a, b``,
    ``import sgdrank.a``, ``from sgdrank.a import f``, ``sgdrank.a.f``). IPython magics and shell
    lines are dropped before parsing."""
    lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return set(re.findall(r"sgdrank\.(\w+)", code))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "sgdrank":
                names |= {a.name for a in node.names}
            elif node.module.startswith("sgdrank."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sgdrank.")}
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "sgdrank"):
            names.add(node.attr)
    return names


def _lib_module_path(name: str) -> Path | None:
    for cand in (LIB / f"{name}.py", LIB / name / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _lib_imports(path: Path) -> set[str]:
    """sgdrank submodules that a library file imports (relative or absolute)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level >= 1:  # from . import x / from .x import y
                out |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod == "sgdrank":
                out |= {a.name for a in node.names}
            elif mod.startswith("sgdrank."):
                out.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sgdrank.")}
    return out


def lib_dependencies(nb: dict) -> list[str]:
    """Library files (relative to lib/sgdrank) the chapter depends on, transitively; always
    includes ``__init__.py``."""
    todo = set()
    for c in code_cells(nb):
        todo |= _modules_named_in(_source(c))
    seen: dict[str, Path] = {"__init__": LIB / "__init__.py"}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _lib_module_path(name)
        if path is None:
            continue  # a name imported from the package, not a module
        seen[name] = path
        todo |= _lib_imports(path)
    return sorted(str(p.relative_to(LIB)) for p in seen.values())


def lib_hash(files: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update(b"\0")
        h.update((LIB / rel).read_bytes())
    return h.hexdigest()


def relative_papermill_paths(nb: dict) -> dict:
    """Rewrite papermill's ``input_path``/``output_path`` relative to the repository root (in
    place), so a committed notebook records no machine's directories."""
    pm = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        p = pm.get(key)
        if p and Path(p).is_absolute():
            try:
                pm[key] = str(Path(p).resolve().relative_to(ROOT))
            except ValueError:
                pm[key] = Path(p).name
    return nb


def absolute_paths(nb: dict) -> list[str]:
    """Absolute paths of the machine that ran the notebook, found anywhere in its JSON (the
    repository root, the home directory)."""
    text = json.dumps(nb)
    roots = {str(ROOT), str(Path.home())}
    return sorted({r for r in roots if len(r) > 1 and r in text})


def stamp(nb: dict, profile: str) -> dict:
    """The metadata record written after a successful run."""
    files = lib_dependencies(nb)
    return {"profile": profile, "code_sha256": code_hash(nb), "lib_files": files,
            "lib_sha256": lib_hash(files)}


def problems(nb: dict, expected_profile: str = "book") -> list[str]:
    """Why a committed notebook is not a clean, fresh, top-to-bottom run (empty list: it is)."""
    out = []
    meta = nb.get("metadata", {}).get(META_KEY)
    if not meta:
        return ["never executed by tools/run_chapters.py (no 'sgdrank' metadata)"]
    if meta.get("profile") != expected_profile:
        out.append(f"executed in profile {meta.get('profile')!r}, not {expected_profile!r}")
    if meta.get("code_sha256") != code_hash(nb):
        out.append("code cells changed since the notebook was executed")
    files = lib_dependencies(nb)
    if files != meta.get("lib_files") or lib_hash(files) != meta.get("lib_sha256"):
        out.append("library changed since the notebook was executed "
                   f"(depends on {', '.join(files)})")
    counts = []
    for i, c in enumerate(code_cells(nb)):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"code cell {i} has an error output: "
                           f"{o.get('ename')}: {o.get('evalue')}")
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                first = _source({"source": o.get("text", "")}).strip().splitlines()[:1]
                out.append(f"code cell {i} wrote to stderr (a warning or a live progress bar in "
                           f"the published page): {first[0][:120] if first else ''!r}")
        if _source(c).strip():
            counts.append(c.get("execution_count"))
    if counts != list(range(1, len(counts) + 1)):
        out.append(f"execution counts {counts} are not 1..{len(counts)}: not one top-to-bottom run")
    pm = nb.get("metadata", {}).get("papermill", {})
    if pm.get("exception"):
        out.append("papermill recorded an exception")
    for key in ("input_path", "output_path"):
        if Path(str(pm.get(key) or "")).is_absolute():
            out.append(f"papermill's {key} is an absolute path ({pm[key]!r}): re-execute with "
                       f"tools/run_chapters.py, which writes it relative to the repository")
    for root in absolute_paths(nb):
        out.append(f"the notebook records this machine's path {root!r} (tools/run_chapters.py "
                   f"writes relative papermill paths)")
    return out
