"""The peak of live tensor bytes in this process, counted from the tensors themselves (no allocator, no RSS).

``LiveTensorPeak`` is a dispatch mode: every storage an operator creates is counted once (views share it) until
it is freed (a finalizer on the storage's Python object, which torch keeps alive exactly as long as the storage)
or resized (FSDP2 frees and refills its unsharded parameters with ``UntypedStorage.resize_``, outside the
dispatcher: counted through a wrapper installed while the mode is active). A DTensor counts its local shard.
Temporaries made inside a tensor subclass's own dispatch (DTensor's local ops) are not seen; only its results.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)

    def _track(self, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            return
        local = getattr(t, "_local_tensor", None)  # DTensor: its shard
        t = local if isinstance(local, torch.Tensor) else t
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        key = id(s)
        if key in self.sizes:
            return
        self.sizes[key] = n = s.nbytes()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(s, self._free, key)

    def _resized(self, s: torch.UntypedStorage) -> None:
        key = id(s)
        if key in self.sizes:
            n = s.nbytes()
            self.now += n - self.sizes[key]
            self.sizes[key] = n
            self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out

    def __enter__(self):
        orig = self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(s, n):
            r = orig(s, n)
            tracker._resized(s)
            return r

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)
