"""The copy-paste examples of README.md and docs/*.md run as written.

Every fenced python or bash block carries a marker on the line before its opening fence (an HTML comment, invisible
on GitHub):

    <!-- example: run -->             run as written
    <!-- example: run offline -->     run with random weights where the block would download the released ones:
                                      `pretrained=False` is added to `torch.hub.load(...)` / `load_model("<hub
                                      name>")` calls, "path/to/panopticon" becomes this checkout, and
                                      `panopticon embed` without `--model` (the release) gets `--random-init`
    <!-- example: skip: REASON -->    not run (a download, a dataset, minutes of compute); reported as skipped

A block without a marker fails `test_every_example_is_marked`. The blocks of a page run in document order in one workspace the test writes:
`S2.tif` (a 4-band Sentinel-2-like GeoTIFF), `scenes.yaml` (that file as a scenes YAML) and `runs/mine` (a tiny
training run folder). Python blocks are executed, and a line `<expression>  # tensor([...])` must give the tensor
its comment shows; bash blocks run line by line in this process through the
`panopticon` entry point (`panopticon ARGS`, `python -m dinov2 ARGS`, `python -m dinov2.run.<command> ARGS`;
`> FILE` writes the output to FILE). The network is never used (PANOPTICON_OFFLINE=1).
"""
import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT

PAGES_NOT_MARKED: set = set()  # pages whose blocks are not marked yet (reported as skipped); none today
FENCE = re.compile(r"^```(python|bash|sh|shell|console)\s*$")
MARKER = re.compile(r"^<!-- example: (run|run offline|skip: (?P<reason>.+?)) -->$")
HUB_NAMES = ("panopticon_vitb14", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")


def _pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _blocks(page: Path):
    """(line number, language, marker text or None, code) of every python/bash block of a page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].startswith("```"):  # another language (yaml, text): skip to its closing fence
                i = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = lines[i - 1] if i else ""
        out.append((i + 1, m.group(1), prev if prev.startswith("<!-- example") else None,
                    "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


ALL = [(_rel(p), line, lang, marker, code) for p in _pages() for line, lang, marker, code in _blocks(p)]


def test_every_example_is_marked():
    bad = [f"{page}:{line}: {marker or 'no marker'}" for page, line, _, marker, _ in ALL
           if page not in PAGES_NOT_MARKED and (marker is None or not MARKER.match(marker))]
    assert bad == [], "mark each block <!-- example: run -->, <!-- example: run offline --> or " \
                      "<!-- example: skip: REASON -->:\n" + "\n".join(bad)
    assert sum(1 for *_, marker, _ in ALL if marker and marker.startswith("<!-- example: run")) >= 10


SKIPPED = [(page, line, marker) for page, line, _, marker, _ in ALL
           if marker is None or MARKER.match(marker).group("reason")]


@pytest.mark.parametrize("page,line,marker", SKIPPED, ids=[f"{p}:{n}" for p, n, _ in SKIPPED])
def test_skipped_example(page, line, marker):
    """Listed so that every block not run shows up, with its reason, in the test report."""
    if marker is None:
        pytest.skip(f"{page}:{line}: the examples of {page} are not marked yet")
    pytest.skip(f"{page}:{line}: {MARKER.match(marker).group('reason')}")


def _offline_python(code: str) -> str:
    code = code.replace('"path/to/panopticon"', repr(str(ROOT)))
    code = re.sub(r"(torch\.hub\.load\([^()\n]*)\)", r"\1, pretrained=False)", code)
    names = "|".join(HUB_NAMES)
    return re.sub(rf"""(load_model\(["'](?:{names})["'])\)""", r"\1, pretrained=False)", code)


def _run_python(code: str, where: str) -> None:
    namespace = {"__name__": "__doc_example__"}
    with torch.no_grad():
        exec(compile(code, where, "exec"), namespace)
    for expr, shown in re.findall(r"^(\S.*?)\s+# tensor\((\[.*?\])\)", code, re.M):  # stated values hold
        got = eval(expr, namespace).tolist()
        assert got == ast.literal_eval(shown), f"{where}: {expr} gives {got}, not {shown}"


def _offline_argv(argv):
    if argv[:1] == ["embed"] and "--model" not in argv:
        return argv + ["--random-init"]
    return argv


def _command_lines(code: str):
    """The shell lines of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            yield line.strip(), argv


def _panopticon_args(argv, where):
    if argv[0] == "panopticon":
        return argv[1:]
    if argv[0] == "python" and argv[1:2] == ["-m"] and argv[2] == "dinov2":
        return argv[3:]
    if argv[0] == "python" and argv[1:2] == ["-m"] and argv[2].startswith("dinov2.run."):
        return [argv[2].rsplit(".", 1)[1]] + argv[3:]
    raise AssertionError(f"{where}: only panopticon commands run in this test; mark the block skip: {argv}")


def _run_bash(code: str, where: str, offline: bool) -> None:
    from dinov2.run import cli

    for line, argv in _command_lines(code):
        target = None
        if ">" in argv:
            k = argv.index(">")
            argv, target = argv[:k], argv[k + 1]
        args = _panopticon_args(argv, where)
        args = _offline_argv(args) if offline else args
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                rc = cli.main(args)
            except SystemExit as e:  # --help and argparse errors
                rc = e.code
        assert rc in (0, None), f"{where}: `{line}` exited with {rc}\n{out.getvalue()[-2000:]}"
        if target:
            Path(target).write_text(out.getvalue())


def _workspace(folder: Path) -> None:
    """The files the examples name: S2.tif, scenes.yaml, runs/mine."""
    from test_embed import S2_BANDS, smooth_scene, write_run, write_tif

    write_tif(folder / "S2.tif", smooth_scene(420, 420, seed=3))
    (folder / "scenes.yaml").write_text(yaml.safe_dump(
        {"scenes": [{"sensor": "sentinel2", "file": "S2.tif", "bands": S2_BANDS, "name": "S2"}]}))
    write_run(folder / "runs" / "mine", seed=0)


RUN_PAGES = sorted({page for page, _, _, marker, _ in ALL if marker and marker.startswith("<!-- example: run")})


@pytest.mark.parametrize("page", RUN_PAGES)
def test_examples_run(page, tmp_path, monkeypatch):
    pytest.importorskip("rasterio")
    monkeypatch.chdir(tmp_path)
    for name, value in (("PANOPTICON_OFFLINE", "1"), ("PANOPTICON_NO_PROGRESS", "1"), ("OMP_NUM_THREADS", "1"),
                        ("TORCH_HOME", str(tmp_path / "torch_home"))):
        monkeypatch.setenv(name, value)
    _workspace(tmp_path)
    for p, line, lang, marker, code in ALL:
        if p != page or not marker or not marker.startswith("<!-- example: run"):
            continue
        where, offline = f"{page}:{line}", "offline" in marker
        if lang == "python":
            _run_python(_offline_python(code) if offline else code, where)
        else:
            _run_bash(code, where, offline)
