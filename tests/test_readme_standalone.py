"""Every ```python block of README.md and of the site (``docs/``) runs when pasted alone into
a fresh interpreter.

Each block runs in its own ``python`` subprocess (``tests/_readme.py``): an empty working
directory, ``HYPERGRADIENT_DATA`` passed through, warnings as errors, a timeout.  Nothing
from another block, from pytest's process or from its float64 default reaches it, so a block
that leans on an earlier one fails here.  The tests beside each feature check what the blocks
compute, from the same runs (each block runs once per session).
"""

import pytest

import _readme

BLOCKS = _readme.blocks()
EXAMPLES = {block.where: _readme.Example(block, {}, None) for block in BLOCKS}


def test_the_readme_has_its_python_examples():
    assert len(BLOCKS) >= 20
    assert all(block.code.strip() for block in BLOCKS)


@pytest.mark.parametrize("where", sorted(EXAMPLES))
def test_readme_block_runs_alone_in_a_fresh_interpreter(where):
    EXAMPLES[where].run()  # asserts exit code 0, showing the block's stderr otherwise


def test_blocks_that_read_dataset_files_are_recognised():
    # such a block is skipped, with tests/_datasets.py's reason, where the files are missing
    def needs(code):
        return _readme.needed_data(_readme.Block(1, code))

    assert needs("x, y = hg.data.load_mnist(None, split='test')") == ["mnist"]
    assert needs('learned.ClassifierFamily("fashion-mnist", "mlp")') == ["fashion-mnist"]
    assert needs("train, test = meta.omniglot_tasks(None, ways=5)") == ["omniglot"]
    assert needs("split = hg.data.load_digits_split()") == []
