"""The documentation is self-contained (no reference to documents outside the repository, every docs/ link exists),
the README fits on one page and links every command to its page, and docs/install.md lists the extras as
pyproject.toml declares them. The examples themselves run in test_doc_examples.py."""
import re

import pytest

from conftest import ROOT

# names of the maintainers' notes kept outside the repository, spelled in pieces so this file does not match itself
_OUTSIDE = ["DESIGN" + ".md", "reference" + " §", "panopticon" + "_reference", ".." + "/shared"]
FORBIDDEN = re.compile("|".join(re.escape(name) for name in _OUTSIDE))
DOC_LINK = re.compile(r"docs/[\w./-]+\.md")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text_files():
    paths = [ROOT / "hubconf.py", ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "pyproject.toml"]
    for folder, patterns in (("dinov2", ("*.py", "*.yaml")), ("docs", ("*.md",)), ("benchmarks", ("*.py", "*.md"))):
        for pattern in patterns:
            paths.extend(sorted((ROOT / folder).rglob(pattern)))
    return [p for p in paths if p.is_file()]


def test_no_reference_to_documents_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _text_files()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if FORBIDDEN.search(line)]
    assert hits == [], "\n".join(hits)


def test_every_docs_link_exists():
    missing = []
    for p in _text_files():
        text = p.read_text(encoding="utf-8")
        for link in DOC_LINK.findall(text):
            if not (ROOT / link).is_file():
                missing.append(f"{p.relative_to(ROOT)} -> {link}")
        if p.suffix == ".md":  # relative markdown links inside README.md and docs/
            for link in MD_LINK.findall(text):
                if not link.startswith(("http://", "https://", "mailto:")) and not (p.parent / link).exists():
                    missing.append(f"{p.relative_to(ROOT)} -> {link}")
    assert missing == [], "\n".join(missing)


def test_docs_index_lists_every_document_and_code_points_to_docs():
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert {"architecture.md", "data.md", "training.md", "evaluation.md", "patch_embedding.md",
            "differences.md", "hub.md", "interop.md"} <= set(docs)
    index = (ROOT / "docs" / "README.md").read_text()
    assert [d for d in docs if f"]({d})" not in index] == []
    assert "docs/patch_embedding.md" in (ROOT / "dinov2" / "models" / "panopticon.py").read_text()
    assert "docs/" in (ROOT / "README.md").read_text()


def test_readme_is_one_page_with_every_command_linked_to_its_docs_page():
    from dinov2.run.cli import COMMANDS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `panopticon (\w+)` \|.*\]\((docs/[\w.]+\.md)\) \|$",
                                                         text, re.M)}
    assert sorted(rows) == sorted(COMMANDS), "the README's command table must list every command once"
    for name, page in rows.items():
        assert f"panopticon {name}" in (ROOT / page).read_text(encoding="utf-8"), f"{page} does not show {name}"


def _extras_table():
    """{extra: set of package names} from the table in docs/install.md (`x` + a, b expands extra x)."""
    text = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    section = text.split("## Extras", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", section, re.M)
    return {name: {p.strip() for p in cell.replace("`", "").replace("+", ",").split(",") if p.strip()}
            for name, cell in rows}


def test_install_docs_list_each_extra_with_its_packages():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    documented = _extras_table()
    assert sorted(documented) == sorted(extras)
    for name, reqs in extras.items():
        want = set()
        for req in reqs:
            m = re.match(r"panopticon\[([\w,]+)\]", req)
            want |= set(m.group(1).split(",")) if m else {re.split(r"[\[<>=~! ]", req)[0]}
        assert documented[name] == want, f"extra {name}: docs/install.md lists {sorted(documented[name])}, " \
                                         f"pyproject.toml {sorted(want)}"
