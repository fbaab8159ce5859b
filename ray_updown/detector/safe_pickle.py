"""Reading published pickles without running their code.

A pickle is a program: any global it names is imported and may be called (os.system via
__reduce__ is the classic attack). `safe_unpickle` resolves only an allow-list of globals that
rebuild numpy arrays and plain containers; anything else is refused with a CheckpointError that
names the file and the offending global. `.pth`/`.bin` files go through
`torch.load(weights_only=True)`, PyTorch's own restricted unpickler.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any

from ray_updown.errors import CheckpointError

# (module, name) pairs that rebuild arrays, dtypes and containers, and nothing else.
# numpy 2 moved numpy.core to numpy._core; old pickles name the former.
_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    # Python 3 pickles of bytes at protocol < 3 go through _codecs.encode(str, "latin1").
    ("_codecs", "encode"): ("_codecs", "encode"),
}


def _resolve(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        # numpy 1.x has no numpy._core; fall back to the historical module path.
        legacy = module.replace("numpy._core", "numpy.core")
        return getattr(importlib.import_module(legacy), name)


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str | None):
        super().__init__(file, encoding="latin1")  # Python 2 era pickles (Caffe conversions)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise CheckpointError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain "
                "containers are allowed (the file would run code)", file=self.source)
        return _resolve(*target)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing a pickle with persistent ids (a torch file? use .pth)",
                              file=self.source)


def safe_unpickle(data: bytes, source: str | None = None) -> Any:
    """Unpickle `data` allowing only arrays and containers; anything else is a CheckpointError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or malformed streams
        raise CheckpointError(f"not a readable pickle ({type(exc).__name__}: {exc})",
                              file=source) from None


def _numpy_globals() -> list[Any]:
    """The numpy globals an array inside a torch file needs (array data, never code)."""
    import numpy as np

    dtypes = [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8",
                                                 "u1", "u2", "u4", "u8", "b1")]
    return [_resolve("numpy._core.multiarray", "_reconstruct"),
            _resolve("numpy._core.multiarray", "scalar"), np.ndarray, np.dtype, *dtypes]


def safe_torch_load(data: bytes, source: str | None = None) -> Any:
    """torch.load with weights_only=True (tensors, numpy arrays and containers only)."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"refused or unreadable torch file ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            file=source) from None
