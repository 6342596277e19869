"""Files that survive a kill: atomic checkpoint and JSON writes, and checkpoint reads that
say which file is bad. Shared by the training loop, the recipes and meta-training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ._errors import HypergradientError


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp``, then ``os.replace``: a kill mid-write keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as JSON (numbers it cannot write as floats), replacing ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, default=float))
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, where: str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint; a truncated or foreign file raises a
    :class:`~hypergradient.HypergradientError` that starts with ``where`` and says which."""
    try:
        return torch.load(Path(path), weights_only=False)
    except Exception as err:
        raise HypergradientError(
            f"{where}: could not read the checkpoint {str(path)!r} ({type(err).__name__}: "
            f"{err}). Delete it to start over."
        ) from None
