"""How many torch intra-op threads a run of a given model size should use.

Small models make small ops: splitting a 64 x 128 matrix product over two threads gains
nothing, and on a busy machine the second thread spin-waits for a core. Measured on a 2-core
machine with another job running: one SGD step of a 64-128-10 MLP took 0.39 ms on one thread
and 4.1 ms on two, and the demo 30 s instead of 217 s. So runs of models below
:data:`SMALL_MODEL` parameters use one thread, larger ones torch's own setting, and an
explicit request always wins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._errors import HypergradientError

#: models with fewer parameters than this run on one thread unless told otherwise
SMALL_MODEL = 1_000_000


def threads_for(num_params: int, requested: int | None = None) -> int:
    """The intra-op thread count for a model of ``num_params`` parameters: ``requested`` when
    it is a positive int, else 1 below :data:`SMALL_MODEL` parameters and torch's current
    setting above (``requested`` of ``None`` or 0 means "choose")."""
    if requested is not None and (
        not isinstance(requested, int) or isinstance(requested, bool) or requested < 0
    ):
        raise HypergradientError(
            f"threads={requested!r}: expected an int >= 1, or 0 / None to choose by model size."
        )
    if requested:
        return requested
    return 1 if num_params < SMALL_MODEL else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the ``with`` block (``n = 0``: torch's setting is
    left alone); the previous count is restored afterwards, also after an exception."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
