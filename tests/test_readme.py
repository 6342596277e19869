"""The README's code example runs as written (documentation that cannot go stale)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md should contain a ```python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["d_log_l2"]["log_l2"].shape == torch.Size([10, 64])
    assert torch.isfinite(namespace["d_unrolled"]["log_l2"]).all()
    assert "torch.Size([10, 64])" in capsys.readouterr().out
