"""The README's first examples run as written (documentation that cannot go stale).

They run in a fresh interpreter, as a reader pastes them (``tests/_readme.py``).
"""

import _readme

CORE = _readme.example(
    "d_unrolled = hg.unrolled_hypergrad(",
    shape="list(d_log_l2['log_l2'].shape)",
    finite="bool(torch.isfinite(d_unrolled['log_l2']).all())",
)
LOOP = _readme.example(
    "hg.BilevelTrainer(",
    n_history="len(history)",
    hyper_step="trainer.hyper_step",
    val_first="history[0]['val_loss']",
    val_last="history[-1]['val_loss']",
)


def test_readme_python_example_runs():
    first = _readme.blocks("README.md")[0]
    assert first == CORE.block, "README.md should start with the core example"
    run = CORE.run()
    assert run.values["shape"] == [10, 64]
    assert run.values["finite"]
    assert "torch.Size([10, 64])" in run.stdout


def test_readme_training_loop_example_runs():
    run = LOOP.run()  # float32, as a user's session would be
    values = run.values
    assert values["n_history"] == 100 and values["hyper_step"] == 100
    # the example writes its run folder in the working directory
    assert (run.cwd / "hypergradient-runs/my-model/hyper_steps.jsonl").exists()
    assert (run.cwd / "hypergradient-runs/my-model/ckpt.pt").exists()
    # the weights are fitted: the validation loss fell far below its starting value
    assert values["val_last"] < 0.5 * values["val_first"]
