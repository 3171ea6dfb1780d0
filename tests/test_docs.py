"""The documentation is self-contained: no reference to documents outside the repository, every docs/ link exists."""
import re

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
