"""The README's usage example runs as written (with random weights instead of the download)."""
import re

import torch

from conftest import ROOT


def test_readme_usage_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using Panopticon.*?```python\n(.*?)```", text, re.S).group(1)
    load_line = "model = torch.hub.load('<path or github repo of this code>', 'panopticon_vitb14')"
    assert load_line in block
    code = block.replace(load_line, f"model = torch.hub.load({str(ROOT)!r}, 'panopticon_vitb14', source='local', "
                                    "pretrained=False)")
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), {})
