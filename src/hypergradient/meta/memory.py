"""Exact accounting of the memory autograd graphs hold: the bytes of saved tensors.

A backward pass needs some tensors of the forward pass (activations, weights, masks);
autograd keeps them in the graph until it is freed.  :class:`SavedTensorMeter` counts them
through ``torch.autograd.graph.saved_tensors_hooks``: every tensor a graph saves is wrapped
in a small object that adds its storage's bytes to the live total when created and
subtracts them when the graph releases it, and the meter reports the peak.  Storages shared
by several saved tensors (a weight saved by several operations, views of one activation) are
counted once while any of them is alive.

This measures exactly what grows with the number of unrolled steps (the graph) and nothing
else: not the allocator's caching, not the tensors the caller holds outside any graph, not
temporaries freed before the next saved tensor.  ``benchmarks/meta_memory.py`` reports it
next to the process's peak resident memory.

Examples:
    >>> import torch
    >>> x = torch.ones(1000, requires_grad=True)
    >>> with SavedTensorMeter() as meter:
    ...     y = (x * x).sum()        # mul saves both inputs: one storage, 4000 bytes
    ...     y.backward()
    >>> meter.peak_bytes, meter.live_bytes
    (4000, 0)
"""

from __future__ import annotations

import torch

__all__ = ["SavedTensorMeter"]


class _Saved:
    """A saved tensor, with a finaliser that gives its storage's bytes back to the meter."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorMeter):
        # Detached: keeping the tensor itself would make a reference cycle through C++ when
        # it is an output of the node that saves it (tensor -> grad_fn -> saved variable ->
        # this object -> tensor), one Python's gc cannot break.  Nothing is lost: autograd
        # puts the right grad_fn back when the tensor is unpacked.
        self.tensor = tensor.detach()
        self.meter = meter
        storage = tensor.untyped_storage()
        self.key = (storage.data_ptr(), tensor.device.type)
        meter._acquire(self.key, storage.nbytes())

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager: live and peak bytes of tensors saved by autograd graphs built inside.

    Attributes: ``live_bytes`` (now), ``peak_bytes`` (largest seen), ``saved_count``
    (tensors saved in all).  Graphs built inside the block are tracked until they are freed,
    even after the block ends.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> x = torch.ones(256, requires_grad=True)
        >>> with hg.meta.SavedTensorMeter() as meter:
        ...     y = torch.sin(x).sum()  # sin saves its input: 256 float32 values
        >>> meter.live_bytes, meter.saved_count
        (1024, 1)
        >>> del y  # frees the graph
        >>> meter.live_bytes, meter.peak_bytes
        (0, 1024)
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self.saved_count = 0
        self._storages: dict[tuple[int, str], list[int]] = {}  # key -> [references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _acquire(self, key, nbytes: int) -> None:
        self.saved_count += 1
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, nbytes]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[0] += 1

    def _release(self, key) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._storages[key]

    def _pack(self, tensor: torch.Tensor):
        return _Saved(tensor, self)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
