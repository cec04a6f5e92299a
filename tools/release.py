"""What a tagged edition ships (``make release``): one archive
``_build/release/sgdrank-<version>.tar.gz`` holding, under ``sgdrank-<version>/``,

- ``html/``: the built web book (``_build/html``, opens offline at ``html/index.html``);
- ``notebooks/``: the executed chapters as committed (``book`` profile outputs);
- ``claims.md``, ``CITATION.cff``, ``CHANGELOG.md``, ``README.md``;
- ``MANIFEST.txt``: the version, the commit (when known) and the sha256 of every file.

``<version>`` is ``sgdrank.__version__``; the script refuses to package when the built pages
show another edition number, when ``CITATION.cff`` disagrees, or when a chapter is not a clean,
fresh ``book``-profile run (``booktools.problems``). No PDF: see README.md ("Releases").
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import booktools

ROOT = booktools.ROOT
FILES = ("claims.md", "CITATION.cff", "CHANGELOG.md", "README.md")


def version() -> str:
    """``sgdrank.__version__``, read from the source (no import of the package needed)."""
    text = (booktools.LIB / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise SystemExit("release: no __version__ = \"...\" in lib/sgdrank/__init__.py")
    return m.group(1)


def cff_version(path: Path = ROOT / "CITATION.cff") -> str | None:
    m = re.search(r"^version:\s*['\"]?([^'\"\s]+)", path.read_text(encoding="utf-8"), re.M)
    return m.group(1) if m else None


def shown_versions(html: Path) -> dict[str, set[str]]:
    """``{page: {edition numbers in its footer}}`` for every built page (``sgdrank.edition``);
    redirect pages (``index.html``, a meta refresh to the intro) have no footer and are left out."""
    pat = re.compile(r'class="sgdrank-version">([^<]+)<')
    out = {}
    for p in sorted(html.rglob("*.html")):
        text = p.read_text(encoding="utf-8")
        if "_static" in p.parts or re.search(r'http-equiv="refresh"', text[:500], re.I):
            continue
        out[str(p.relative_to(html))] = set(pat.findall(text))
    return out


def problems(html: Path, chapters: list[Path], v: str) -> list[str]:
    """Why this tree cannot be released as edition ``v`` (empty: it can)."""
    out = []
    if not (html / "index.html").exists():
        return [f"no built book in {html}: run make html first"]
    for page, seen in shown_versions(html).items():
        if seen != {v}:
            out.append(f"{page} shows edition {sorted(seen) or 'none'}, not {v} "
                       "(is sgdrank.edition in _config.yml's extra_extensions? rebuild)")
    if cff_version() != v:
        out.append(f"CITATION.cff has version {cff_version()}, sgdrank.__version__ is {v}")
    if not chapters:
        out.append("no chapters to release")
    for p in chapters:
        bad = booktools.problems(booktools.load(p), "book")
        if bad:
            out.append(f"{p.name}: " + "; ".join(bad))
    return out


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=20).stdout.strip()
        return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build(out_dir: Path, html: Path, chapters: list[Path], v: str, extra: list[Path],
          commit: str = "unknown") -> Path:
    """Write ``out_dir/sgdrank-<v>.tar.gz`` (deterministic member order, fixed mtimes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    top = f"sgdrank-{v}"
    members: list[tuple[str, Path]] = []
    members += [(f"{top}/html/{p.relative_to(html)}", p)
                for p in sorted(html.rglob("*")) if p.is_file()]
    members += [(f"{top}/notebooks/{p.name}", p) for p in chapters]
    members += [(f"{top}/{p.name}", p) for p in extra if p.exists()]
    lines = [f"sgdrank edition {v}", f"commit {commit}", ""]
    lines += [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name[len(top) + 1:]}"
              for name, p in members]
    manifest = ("\n".join(lines) + "\n").encode()
    target = out_dir / f"{top}.tar.gz"
    mtime = int(time.time())
    with tarfile.open(target, "w:gz") as tar:
        for name, p in members:
            info = tar.gettarinfo(str(p), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with p.open("rb") as f:
                tar.addfile(info, f)
        info = tarfile.TarInfo(f"{top}/MANIFEST.txt")
        info.size, info.mtime = len(manifest), mtime
        tar.addfile(info, io.BytesIO(manifest))
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "release")
    args = ap.parse_args(argv)
    v = version()
    chapters = booktools.chapter_paths()
    bad = problems(args.html, chapters, v)
    if bad:
        print(f"release {v}: not packaged:\n  - " + "\n  - ".join(bad), file=sys.stderr)
        return 1
    target = build(args.out, args.html, chapters, v, [ROOT / f for f in FILES], _commit())
    size = target.stat().st_size / 1e6
    print(f"release {v}: {target.relative_to(ROOT)} ({size:.1f} MB): the web book (html/), "
          f"{len(chapters)} executed notebooks (notebooks/), {', '.join(FILES)}, MANIFEST.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
