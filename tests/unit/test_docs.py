"""Docs that point to the right door: every file, module, name and test they cite exists.

Read: README.md and docs/*.md (fenced code blocks left out); the comments of pyproject.toml,
the Makefile, the Dockerfile, the compose files and scripts/*.sh; the comments and
docstrings of every Python file in coupon_stream/, bench/ and tests/. In that text:

1. A path: a word that starts with one of the repository's top folders (`coupon_stream/`,
   `tests/`, `bench/`, `scripts/`, `docs/`, `infra/`) or of the package's layers (`core/`,
   `pipeline/`, ...: under coupon_stream/), or a bare file name ending in `.py`. It exists
   (a bare name somewhere in the repository). A wildcard or placeholder (`*`, `<`, `{`,
   `$`) ends the word: the folder before it exists. `path::name` names a test function
   defined in that file; `layer/module.Name` (no `.py`) a name that module defines.
2. A dotted module under coupon_stream, bench or tests (`coupon_stream.connectors.engine`,
   `bench.takeover`), followed by any names it defines
   (`coupon_stream.connectors.engine.broker_credentials`).
3. In backticks, `module.name[.attr]` where `module` is the file name of one of the
   package's modules (`engine`, `state`, `checkpoint`; not a package: `app` is Faust's app
   too): the module defines `name` (a def, class or assignment at its top level; a name it
   only imports does not count, unless re-exported as `import x as x`) and the class
   `name` has `attr`. An instance named after the module's class of that name counts too
   (`settings.app_id`: a Settings' field).
4. In backticks, `Class.attr` where a module of the package defines `Class`: the class has
   `attr` (in its body, as `self.attr = ...`, or from a base class of the package; a class
   with a base from another library is not checked further).
5. In backticks, a word that starts with `test_`: a test function of that name is defined
   under tests/ (`test_kill_9_with_standby_replicas`).
6. A section: README or `docs/<name>.md`, then a comma or a space, then a quoted title
   (`docs/design.md, "Fencing"`): a heading of that file starts with the title (a title
   cut short with "..." by what comes before).

Call arguments in backticks (`engine.commit(app, offsets)`) are ignored. Names of other
libraries (`Consumer._new_offset`, `faust.Table`) and words that match no rule are not
checked. A statement that cites a file that exists for the wrong reason cannot be caught
here: cite the test or the name itself, which is
(`test_checkpoint.py::test_any_order_batching_and_crash_equals_the_spec`).
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PACKAGE = ROOT / "coupon_stream"
TOPS = ("coupon_stream", "tests", "bench", "scripts", "docs", "infra")
ROOTS = ("coupon_stream", "bench", "tests")  # importable: rule 2
LAYERS = tuple(sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
SKIPPED_DIRS = {"__pycache__", "node_modules"}

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
PATH = re.compile(
    rf"(?<![\w./-])((?:{'|'.join(TOPS + LAYERS)})/[\w./-]*|[\w-]+\.py)(?:::\s*(\w+))?"
)
MODULE = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})(?:\.\w+)+)")
SECTION = re.compile(r"(README(?:\.md)?|docs/\w+\.md)[`'’s]*,?\s+\"([^\"]+)\"")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
TEST = re.compile(r"test_\w+(?:\[.*\])?")
EXTENSIONS = {"py", "md", "toml", "sh", "yml", "yaml", "json", "jsonl", "conf", "properties"}


# -- what the repository holds -------------------------------------------------------------


@dataclass
class Module:
    """A Python file's top-level names (imports left out) and its classes' attributes."""

    path: Path
    names: set[str] = field(default_factory=set)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)  # at any depth: test functions


@cache
def module(path: Path) -> Module:
    tree = ast.parse(path.read_text(), str(path))
    found = Module(path)
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If | ast.Try):  # TYPE_CHECKING, optional imports
            body[:0] = [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            found.names.add(node.name)
            found.classes[node.name] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):  # an explicit re-export only
            found.names.update(a.name for a in node.names if a.asname == a.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = (n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            found.names.update(n.id for n in names)
    found.functions = {
        n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    return found


def _class_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(item.name)
        elif isinstance(item, ast.Assign | ast.AnnAssign):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    for n in ast.walk(node):  # self.x = ... in any method
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
        ):
            names.add(n.attr)
    return names


def has_attr(node: ast.ClassDef, attr: str) -> bool:
    """Whether the class (or a base class of the package) has `attr`; True when a base is
    another library's (not checked)."""
    if attr in _class_names(node):
        return True
    for base in node.bases:
        name = base.id if isinstance(base, ast.Name) else None
        if name in ("object", "Protocol", "NamedTuple"):
            continue
        ours = package_classes().get(name or "")
        if not ours:
            return True  # another library's base
        if any(has_attr(c, attr) for c in ours):
            return True
    return False


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS or name.endswith(".egg-info")


@cache
def files() -> tuple[Path, ...]:
    """The repository's files and folders (no .venv, caches or build output)."""
    out = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        out += [Path(folder, n) for n in [*dirs, *sorted(names)] if not _skipped(n)]
    return tuple(out)


@cache
def package_modules() -> dict[str, list[Path]]:
    """Short name (the file's stem) -> the package's modules of that name (packages left out)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem != "__init__":
            found.setdefault(path.stem, []).append(path)
    return found


@cache
def package_classes() -> dict[str, list[ast.ClassDef]]:
    found: dict[str, list[ast.ClassDef]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, node in module(path).classes.items():
            found.setdefault(name, []).append(node)
    return found


@cache
def defined_tests() -> frozenset[str]:
    return frozenset(
        name
        for path in (ROOT / "tests").rglob("test_*.py")
        for name in module(path).functions
        if name.startswith("test_")
    )


# -- the rules -------------------------------------------------------------------------------


def names_in(path: Path, names: list[str]) -> str | None:
    """None if the module at `path` defines names[0] and, for a class, names[1]; else why not."""
    if not names:
        return None
    mod = module(path)
    rel = path.relative_to(ROOT)
    if names[0] not in mod.names:
        return f"{rel} defines no {names[0]}"
    if len(names) > 1 and names[0] in mod.classes and not has_attr(mod.classes[names[0]], names[1]):
        return f"{names[0]} in {rel} has no {names[1]}"
    return None


def module_name(path: Path, names: list[str]) -> str | None:
    """Rule 3: `names_in`, or a field of the module's class named after it (`settings.app_id`)."""
    why = names_in(path, names)
    own = next((c for n, c in module(path).classes.items() if n.lower() == path.stem), None)
    if why and own is not None and names[0] in _class_names(own):
        return None
    return why


def check_path(word: str, test: str | None, then: str) -> str | None:
    """Rule 1 for a path; `then` is the character after it in the text."""
    word = word.rstrip(".,:;-")
    if then and then in "<*{$":  # a placeholder: what comes before it
        word = word.rpartition("/")[0]
    for base in (ROOT, PACKAGE):
        if (base / word).exists():
            target: Path | None = base / word
            break
    else:
        same = [p for p in files() if p.name == word] if "/" not in word else []
        target = same[0] if same else None
    if target is None and "/" in word:  # layer/module.Name
        stem, _, rest = word.partition(".")
        for base in (ROOT, PACKAGE):
            if (base / f"{stem}.py").is_file():
                return names_in(base / f"{stem}.py", rest.split("."))
    if target is None:
        return "no such file"
    if test and target.suffix == ".py" and test not in module(target).functions:
        return f"{target.relative_to(ROOT)} has no test {test}"
    return None


def check_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file():
            return names_in(base.with_suffix(".py"), parts[i:])
        if base.is_dir():
            init = base / "__init__.py"
            if i == len(parts):
                return None
            if init.is_file() and parts[i] in module(init).names:
                return names_in(init, parts[i:])
            return f"no module or name {'.'.join(parts[: i + 1])}"
    return "no such module"


def check_span(span: str) -> list[tuple[str, str]]:
    """Rules 3, 4 and 5 for one backticked span: (reference, why) for each stale one."""
    stale = []
    for word in re.sub(r"\(.*?\)", "", span).split():
        word = word.strip(".,:;()")
        if TEST.fullmatch(word):
            name = word.partition("[")[0]
            if name not in defined_tests():
                stale.append((word, "no such test under tests/"))
            continue
        if not DOTTED.fullmatch(word) or word.rpartition(".")[2] in EXTENSIONS:
            continue
        first, *rest = word.split(".")
        if first in package_modules():
            whys = [module_name(p, rest) for p in package_modules()[first]]
            if all(whys):
                stale.append((word, str(whys[0])))
        elif first in package_classes():
            if not any(has_attr(c, rest[0]) for c in package_classes()[first]):
                stale.append((word, f"class {first} has no {rest[0]}"))
    return stale


@cache
def headings(doc: str) -> tuple[str, ...]:
    path = ROOT / ("README.md" if doc.startswith("README") else doc)
    text = FENCE.sub("", path.read_text()) if path.is_file() else ""
    return tuple(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))


def stale_references(text: str) -> list[tuple[str, str]]:
    """Every reference in `text` (prose: no fenced blocks) that points nowhere, and why."""
    stale = []
    for m in PATH.finditer(text):
        why = check_path(m.group(1), m.group(2), text[m.end() : m.end() + 1])
        if why:
            stale.append((m.group(0), why))
    for m in MODULE.finditer(text):
        why = check_module(m.group(1))
        if why:
            stale.append((m.group(1), why))
    for m in SPAN.finditer(text):
        stale += check_span(" ".join(m.group(1).split()))
    for m in SECTION.finditer(text):
        title = " ".join(m.group(2).split()).removesuffix("...").removesuffix("…").strip()
        if not any(h.startswith(title) for h in headings(m.group(1))):
            stale.append((m.group(0), f'{m.group(1)} has no section "{title}"'))
    return stale


# -- the text they are read in ---------------------------------------------------------------


def prose(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".md":
        return FENCE.sub("", text)
    if path.suffix == ".py":
        comments = [
            tok.string.lstrip("#")
            for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT
        ]
        tree = ast.parse(text)
        docs = [
            ast.get_docstring(n, clean=True) or ""
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        return "\n".join(comments + docs)
    return "\n".join(line.partition("#")[2] for line in text.splitlines() if "#" in line)


def sources() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    config = [ROOT / "pyproject.toml", ROOT / "Makefile", ROOT / "Dockerfile"]
    config += sorted(ROOT.glob("docker-compose*.yml")) + sorted((ROOT / "scripts").glob("*.sh"))
    code = sorted(p for p in files() if p.suffix == ".py" and p.parts[len(ROOT.parts)] in ROOTS)
    return docs + config + code


def test_every_reference_in_the_docs_and_comments_points_somewhere() -> None:
    stale = [
        f"{path.relative_to(ROOT)}: {ref!r}: {why}"
        for path in sources()
        for ref, why in stale_references(prose(path))
    ]
    assert not stale, "stale references:\n" + "\n".join(stale)


def test_a_made_up_reference_of_each_kind_is_reported() -> None:
    made_up = {
        "coupon_stream/pipeline/nowhere.py": "no such file",
        "checkpoint_v2.py": "no such file",
        "tests/unit/test_docs.py::test_nothing_of_the_kind": "has no test",
        "connectors/store.LookupTunedOptions": "defines no LookupTunedOptions",
        "coupon_stream.app.broker_credentials": "no module or name",
        "coupon_stream.nowhere": "no module or name",
        "`settings.STATE_FORMAT`": "defines no STATE_FORMAT",
        "`Versioned.as_of_never`": "has no as_of_never",
        "`test_nothing_of_the_kind`": "no such test",
        'docs/design.md, "Nowhere"': 'no section "Nowhere"',
    }
    for ref, why in made_up.items():
        found = stale_references(f"as said in {ref}, there")
        assert len(found) == 1 and why in found[0][1], (ref, found)
    real = (
        "`coupon_stream/pipeline/checkpoint.py`, checkpoint.py, `checkpoint.CRASH_POINTS`, "
        "`stored.Versioned.as_of`, `Versioned.as_of`, coupon_stream.connectors.engine, "
        "`test_docs.py::test_a_made_up_reference_of_each_kind_is_reported`, "
        '`bench/results/<timestamp>.md`, `Consumer._new_offset`, docs/design.md, "Fencing"'
    )
    assert stale_references(real) == []
