"""The documentation as a product: Markdown only (no Sphinx roles), no internal working words,
code that fits the page, quoted outputs that match their commands, links that resolve."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SOURCES = sorted([*(ROOT / "diffit_toolkit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])

SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|ref|const|term):`[^`\s]")
RST_TABLE_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_WIDTH = 90  # columns of a code block that shows without scrolling at 1280 px

# Words that belong to how the project is worked on, not to the product. The contributors'
# pages (docs/contributing/) are exempt.
WORKING_WORDS = re.compile(
    r"\bSPEC\b|\bsessions?\b|\bhelpers? session|\bwork items?\b|\bTODO\b|\bFIXME\b|\bXXX\b|"
    r"\bnot yet made\b|\bwork log\b|\bthe lead\b|\bissues? #?\d+|\bthe (?:performance|docs) issue\b",
)
USER_PAGES = [page for page in PAGES if "contributing" not in page.relative_to(DOCS).parts]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def docstrings(path: Path):
    """(line, text) of every module, class and function docstring of a source file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield (node.body[0].lineno, doc)


def outside_fences(text: str):
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def sphinx_markup(text: str) -> list[str]:
    """Sphinx/reST markup that Markdown shows as raw text: roles, '::' literal markers, tables."""
    found = [f"line {n}: {line.strip()}" for n, line in outside_fences(text)
             if SPHINX_ROLE.search(line) or line.rstrip().endswith("::") or RST_TABLE_BORDER.match(line)]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_are_markdown(path):
    problems = [f"docstring at line {line}, {problem}" for line, doc in docstrings(path) for problem in sphinx_markup(doc)]
    assert not problems, f"{path.relative_to(ROOT)}: Sphinx markup in docstrings (use [`name`][module.name] " \
                         f"cross-references, fenced code blocks, Markdown tables):\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_pages_have_no_sphinx_markup(page):
    problems = sphinx_markup(page.read_text())
    assert not problems, "\n".join(problems)


def test_the_markup_check_finds_what_it_looks_for():
    assert sphinx_markup("see :class:`Attention` for more") and sphinx_markup(":func:`~a.b`")
    assert not sphinx_markup("roles (`:class:` and friends) are refused")
    assert sphinx_markup("Call it from a test::\n\n    check()")
    assert sphinx_markup("=====  =====\na      b\n=====  =====")
    assert not sphinx_markup("see [`Attention`][diffit_toolkit.nn.attention.Attention]\n```\nx::\n```")


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_user_pages_speak_of_the_product(page):
    hits = [f"line {n}: {m.group(0)!r} in {line.strip()[:100]}"
            for n, line in enumerate(page.read_text().splitlines(), 1) for m in WORKING_WORDS.finditer(line)]
    assert not hits, f"{page.relative_to(DOCS)}: working notes belong on docs/contributing/roadmap.md:\n" + "\n".join(hits)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_speak_of_the_product(path):
    """Docstrings show on the API reference pages: the same rule as the user pages."""
    hits = [f"docstring at line {line}: {m.group(0)!r}" for line, doc in docstrings(path) for m in WORKING_WORDS.finditer(doc)]
    assert not hits, f"{path.relative_to(ROOT)}: working notes in docstrings:\n" + "\n".join(hits)


def test_working_words_are_caught():
    for text in ("see SPEC 2", "the budget of this session", "a work item", "TODO: x", "a core change, not yet made",
                 "(the performance issue)", "issue 18"):
        assert WORKING_WORDS.search(text), text
    for text in ("BlockSpec(dim=96)", "the spec of a block", "an issue tracker"):
        assert not WORKING_WORDS.search(text), text


def code_lines(page: Path):
    """Lines of fenced code blocks, including the files pymdownx.snippets pulls into them."""
    inside = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            continue
        if line.startswith("--8<--"):
            included = ROOT / line.split('"')[1]
            for inner, text in enumerate(included.read_text().splitlines(), 1):
                yield f"{included.relative_to(ROOT)}:{inner}", text
        else:
            yield f"line {number}", line


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_fit_the_page(page):
    wide = [f"{where} ({len(line)} columns): {line[:60]}..." for where, line in code_lines(page)
            if len(line) > CODE_WIDTH and " " in line.strip()]  # one unbreakable token (a URL) may be wider
    assert not wide, f"{page.relative_to(DOCS)}: code lines over {CODE_WIDTH} columns scroll sideways:\n" + "\n".join(wide)


def test_quoted_outputs_match_their_commands():
    """The cheap quoted outputs (mechanism parameter counts, model-info, recipe validate, the quick
    tour) equal a fresh run; those that sample a trained run are checked with --with-runs."""
    docs_outputs = _load("docs_outputs")
    assert docs_outputs.main(["--check"]) == 0


def test_mechanism_table_counts_are_the_toolkits():
    docs_outputs = _load("docs_outputs")
    counts = docs_outputs.mechanism_parameters()
    text = (DOCS / "mechanisms.md").read_text()
    for name, (quick, xl) in counts.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |") and " M |" in line)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-2] == f"{quick:,}" and cells[-1] == f"{xl / 1e6:.2f} M", row
    assert counts["tmsa"][0] == 96 * 3 * 96 + 3 * 96  # Linear(cond 96, 3 x 96) with bias
    assert counts["adaln_zero"][0] == 96 * 6 * 96 + 6 * 96


def test_every_marker_names_a_known_output():
    docs_outputs = _load("docs_outputs")
    keys = [key for page in PAGES for key in docs_outputs.blocks(page)]
    assert keys and set(keys) <= set(docs_outputs.OUTPUTS)


def test_link_checker_finds_missing_pages_and_anchors(tmp_path):
    check = _load("check_site_links").check_site
    (tmp_path / "a").mkdir()
    (tmp_path / "index.html").write_text('<h1 id="top">x</h1><a href="a/">a</a><a href="#top">t</a>'
                                         '<a href="https://example.org/#x">ext</a>')
    (tmp_path / "a" / "index.html").write_text('<a href="../#top">ok</a><a href="../#gone">no anchor</a>'
                                               '<a href="../b/">no page</a><img src="../x.png">')
    problems = check(tmp_path)
    assert len(problems) == 3, problems
    assert any("#gone" in p for p in problems) and any("../b/" in p for p in problems)
    assert any("x.png" in p for p in problems)


def test_long_commands_and_outputs_are_folded_to_the_code_width():
    docs_outputs = _load("docs_outputs")
    command = "diffit-toolkit eval runs/quickstart --guidance-scales 1,1.5,2,3 --num 1000 --plot guidance.png"
    lines = docs_outputs.fold_command(command)
    assert len(lines) > 1 and all(len(line) <= docs_outputs.WIDTH for line in lines)
    assert " ".join(line.rstrip(" \\").strip() for line in lines) == f"$ {command}"
    assert all(line.lstrip().startswith(("$", "--")) for line in lines)  # options stay with their values
    text = "  not checked: " + "word " * 40
    folded = docs_outputs.fold(text.rstrip())
    assert all(len(line) <= docs_outputs.WIDTH for line in folded) and " ".join(folded).split() == text.split()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_speak_of_the_product(path):
    """Docstrings are the API reference's pages: the same words as the user pages."""
    hits = [f"docstring at line {line}: {m.group(0)!r}" for line, doc in docstrings(path) for m in WORKING_WORDS.finditer(doc)]
    assert not hits, f"{path.relative_to(ROOT)}:\n" + "\n".join(hits)
