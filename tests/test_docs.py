"""The repository explains itself (issue #25, item 5): the method is docs/method.md, and no file of the project
points at the specification or the folder that sat beside the repository while it was developed (a clone has
neither), except where paper_scores.py describes the folder it reads the released scores from. Every
`docs/<file>.md §N` reference, and every bare `§N` (docs/README.md: inside docs/ it means that file, elsewhere
docs/method.md), names a section that exists."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()       # quotes what it looks for: not scanned
METHOD = "docs/method.md"

OUTSIDE = re.compile(r"\.\./shared|\bSPEC\b")
# (file, text) pairs allowed to match OUTSIDE: default_scores_dir() reads <repo>/../shared/paper_scores when it
# exists, and its module says so. Nothing else may; every entry must still be in use.
ALLOWED = {("modsep_nb/paper_scores.py", "<repo>/../shared/paper_scores")}

# "docs/method.md §3", "docs/method.md §5.3", "docs/method.md §1, §9, §11", "docs/method.md §5 and §6"
REFERENCE = re.compile(r"docs/([\w.-]+\.md)((?:(?:\s*,\s*|\s+and\s+|\s+)§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6} +(\d+(?:\.\d+)*)\.? ", re.M)
SKIP_DIRS = {".git", ".venv", "outputs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}


def project_files() -> list[str]:
    """What a clone holds: the files git tracks plus new ones it does not ignore (a copy without git: the tree,
    less the virtual environment, run outputs and caches)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return sorted(n for n in names if (ROOT / n).is_file())


def read_text(name: str) -> str | None:
    data = (ROOT / name).read_bytes()
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def outside_references(name: str, text: str) -> tuple[list[str], set]:
    """(lines of `text` that point outside the repository, the ALLOWED entries that excused a line)."""
    bad, used = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not OUTSIDE.search(line):
            continue
        rest = line
        for path, allowed in ALLOWED:
            if path == name and allowed in rest:
                rest = rest.replace(allowed, "")
                used.add((path, allowed))
        if OUTSIDE.search(rest):
            bad.append(f"{name}:{number}: {line.strip()}")
    return bad, used


def sections(name: str) -> set[str]:
    """The numbered sections of a docs file ("1", "5", "5.3", ...), from its headings."""
    return set(HEADING.findall((ROOT / name).read_text(encoding="utf-8")))


def broken_references(name: str, text: str, known=sections) -> list[str]:
    """References in `text` to a docs file that does not exist or to a section it does not have."""
    bad, cited = [], []                       # cited: (docs file, section or None, position in text)
    spans = []
    for m in REFERENCE.finditer(text):
        target = f"docs/{m.group(1)}"
        spans.append(m.span())
        cited.append((target, None, m.start()))
        cited += [(target, s.group(1), m.start(2) + s.start()) for s in SECTION.finditer(m.group(2))]
    own = name if name.startswith("docs/") and name.endswith(".md") else METHOD
    cited += [(own, s.group(1), s.start()) for s in SECTION.finditer(text)
              if not any(a <= s.start() < b for a, b in spans)]
    for target, section, at in cited:
        line = text.count("\n", 0, at) + 1
        if not (ROOT / target).is_file():
            bad.append(f"{name}:{line}: {target} does not exist")
        elif section is not None and section not in known(target):
            bad.append(f"{name}:{line}: {target} has no section §{section}")
    return bad


def test_no_file_points_outside_the_repository():
    bad, used = [], set()
    for name in project_files():
        text = read_text(name)
        if name == THIS or text is None:
            continue
        found, excused = outside_references(name, text)
        bad += found
        used |= excused
    assert not bad, "point these at docs/ instead (docs/README.md):\n" + "\n".join(bad)
    assert used == ALLOWED, f"ALLOWED entries no longer needed: {sorted(ALLOWED - used)}"


def test_every_docs_reference_names_an_existing_section():
    bad = []
    for name in project_files():
        text = read_text(name)
        if name != THIS and text is not None:
            bad += broken_references(name, text)
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for():
    """The two checkers on made-up lines: what must be flagged is, and what is allowed is not."""
    spec, shared = "SPEC", "../shared"
    assert outside_references("x.py", f"see {spec} §3")[0]
    assert outside_references("x.md", f"is `{shared}/{spec}.md`")[0]
    assert outside_references("x.py", f"read from {shared}/paper_scores")[0]
    assert outside_references("x.py", f"(a {spec} asks for >= 100)")[0]
    assert outside_references("x.py", "TEXT_SPECS = {}; SPECIALS = []")[0] == []
    allowed_line = f"else <repo>/{shared}/paper_scores if it exists"
    assert outside_references("modsep_nb/paper_scores.py", allowed_line) == ([], ALLOWED)
    assert outside_references("modsep_nb/other.py", allowed_line)[0]
    assert outside_references("modsep_nb/paper_scores.py", allowed_line + f" ({spec} §13)")[0]

    known = {METHOD: {"1", "5", "5.3", "13"}}.get
    assert broken_references("x.py", "docs/method.md §1, §5 and §5.3; §13", known) == []
    assert broken_references("x.py", "docs/method.md §1, §14", known) == ["x.py:1: docs/method.md has no section §14"]
    assert broken_references("x.py", "ok\n(§99)", known) == ["x.py:2: docs/method.md has no section §99"]
    assert broken_references("x.py", "docs/nowhere.md §1", known) == ["x.py:1: docs/nowhere.md does not exist",
                                                                      "x.py:1: docs/nowhere.md does not exist"]
    assert broken_references("docs/README.md", "§5.3", lambda target: {"5.3"} if target == "docs/README.md" else set())\
        == []


def test_method_sections_are_numbered_in_order():
    text = (ROOT / METHOD).read_text(encoding="utf-8")
    top = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)]
    assert top == list(range(1, len(top) + 1)) and len(top) >= 13, top
    for major, minor in (tuple(map(int, n.split("."))) for n in re.findall(r"^### (\d+\.\d+) ", text, re.M)):
        assert major in top and minor >= 1


def test_the_public_api_section_lists_every_exported_name():
    """Every name `modsep_nb` exports (its __all__, read without importing torch) is in docs/method.md §11."""
    tree = ast.parse((ROOT / "modsep_nb/__init__.py").read_text(encoding="utf-8"))
    exported = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    text = (ROOT / METHOD).read_text(encoding="utf-8")
    api = text[text.index("\n## 11. "):text.index("\n## 12. ")]
    missing = [name for name in exported if f"`{name}" not in api]
    assert not missing, f"{METHOD} §11 does not describe {missing}"
