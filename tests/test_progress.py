"""Progress in logs: plain lines (no carriage-return redraws, a bounded number of them) when stderr is not a
terminal, a tqdm bar on a terminal, nothing when `--no-progress` or PANOPTICON_NO_PROGRESS turns it off. Checked on
the wrapper and on a real command (`panopticon embed`) with stderr redirected to a file."""
import io
import os
import subprocess
import sys

import pytest

from dinov2.utils.progress import LineProgress, bars_allowed, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    for name in ("PANOPTICON_NO_PROGRESS", "PANOPTICON_NO_TQDM"):
        monkeypatch.delenv(name, raising=False)


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="chips", unit="chip", stream=out)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 10  # one per tenth of the work; the last one shows the total, close adds nothing
    assert lines[0].startswith("chips: 100/1000 chip (10%), elapsed ")
    assert lines[-1].startswith("chips: 1000/1000 chip (100%)")


def test_iteration_resume_offset_and_time_based_lines():
    out = io.StringIO()
    assert list(progress_bar(range(7), desc="it", stream=out)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("it: 7/7 it (100%)")
    out = io.StringIO()
    bar = progress_bar(total=100, initial=50, desc="resumed", stream=out)  # half done before a restart
    assert out.getvalue().splitlines() == ["resumed: 50/100 it (50%), elapsed 00:00"]  # where it starts
    bar.update(5)
    assert len(out.getvalue().splitlines()) == 1  # 55 %: no new tenth yet
    bar.update(5)
    assert out.getvalue().splitlines()[1].startswith("resumed: 60/100 it (60%)")
    out = io.StringIO()
    slow = LineProgress(total=None, desc="stream", unit="row", stream=out, min_interval=0.0)
    slow.update(3)
    slow.update(4)
    slow.close()
    assert out.getvalue().splitlines()[-1].startswith("stream: 7 row, elapsed ")  # unknown total: by time


def test_terminal_gets_a_tqdm_bar_and_the_switch_turns_everything_off(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    term = _Terminal()
    bar = progress_bar(total=3, stream=term)
    assert isinstance(bar, tqdm.tqdm) and bars_allowed(stream=term)
    bar.close()
    assert not bars_allowed(enabled=False, stream=term)
    for name in ("PANOPTICON_NO_PROGRESS", "PANOPTICON_NO_TQDM"):
        monkeypatch.setenv(name, "1")
        for stream in (term, io.StringIO()):
            before = stream.getvalue()
            with progress_bar(total=10, stream=stream) as quiet:
                quiet.update(10)
            assert stream.getvalue() == before and not bars_allowed(stream=term)
        monkeypatch.delenv(name)


rasterio = pytest.importorskip("rasterio")
from test_embed import S2_BANDS, smooth_scene, write_run, write_tif  # noqa: E402


@pytest.mark.parametrize("switch", ["", "--no-progress", "PANOPTICON_NO_PROGRESS=1"])
def test_embed_with_stderr_in_a_file_writes_plain_progress_lines(tmp_path, switch):
    """36 chips of a tiny model: at most one line per tenth of the scene, no `\\r`; the switch silences them."""
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "scene.tif", smooth_scene(6 * 28, 6 * 28, seed=2))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(os.path.dirname(os.path.dirname(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    for k in ("PANOPTICON_NO_PROGRESS", "PANOPTICON_NO_TQDM", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "dinov2.run.cli", "embed", tif, "--sensor", "sentinel2", "--bands",
           ",".join(S2_BANDS), "--model", run, "--chip-size", "28", "--overlap", "0", "--batch-size", "4",
           "-o", str(tmp_path / "out")]
    if switch == "--no-progress":
        cmd.append(switch)
    elif switch:
        env.update([switch.split("=")])
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    text = log.read_bytes().decode()  # read_text would turn "\r" into "\n"
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("scene: ")]
    if switch:
        assert lines == []
    else:
        assert 2 <= len(lines) <= 11, lines
        assert lines[-1].startswith("scene: 36/36 chip (100%)")
