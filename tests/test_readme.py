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


def test_readme_training_loop_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    loop = [b for b in blocks if "BilevelTrainer" in b]
    assert loop, "README.md should show the training loop"
    monkeypatch.chdir(tmp_path)  # the example writes its run folder in the working directory
    torch.set_default_dtype(torch.float32)  # as a user's session would be
    namespace: dict = {}
    exec(compile(loop[0], str(README), "exec"), namespace)  # noqa: S102
    history, trainer = namespace["history"], namespace["trainer"]
    assert len(history) == 100 and trainer.hyper_step == 100
    assert (tmp_path / "hypergradient-runs/my-model/hyper_steps.jsonl").exists()
    # the weights are fitted: the validation loss fell far below its starting value
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
