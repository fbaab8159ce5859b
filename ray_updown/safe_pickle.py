"""Reading published pickles without running their code.

A pickle is a program: any global it names is imported and may be called (os.system via
__reduce__ is the classic attack). `safe_unpickle` resolves only an allow-list of globals that
rebuild numpy arrays and plain containers; anything else is refused with a CheckpointError that
names the file and the offending global. `.pth`/`.bin` files go through
`torch.load(weights_only=True)`, PyTorch's own restricted unpickler; its refusals are reported
the same way, naming the global.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import re
import warnings
import zipfile
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
    """torch.load with weights_only=True (tensors, numpy arrays and containers only).

    A refusal names the global the file asked for. torch's own message is not repeated: it
    advises `weights_only=False`, i.e. running the file's code.
    """
    import torch

    try:
        # torch's warnings about an odd file (e.g. its pickle protocol) would be a second line
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        name = _refused_global(str(exc), data) if isinstance(exc, pickle.UnpicklingError) else None
        if name is not None:
            problem = (f"refusing to load global {name}: a torch file may hold only tensors, "
                       "numpy arrays and plain containers (this one would run code)")
        else:
            lines = [line for line in str(exc).splitlines()
                     if line.strip() and "weights_only" not in line.lower().replace(" ", "_")]
            problem = f"unreadable torch file ({type(exc).__name__}" + \
                (f": {lines[0].strip().split('. ')[0]})" if lines else ")")
        raise CheckpointError(problem, file=source) from None


# Modules whose globals a torch state dict legitimately names (tensor rebuilds, containers).
_STATE_MODULES = ("torch", "collections", "numpy", "_codecs")


def _refused_global(message: str, data: bytes) -> str | None:
    """The global torch refused: from its message ("... GLOBAL posix.system ..."), else the
    first global of the file's pickle outside the modules a state dict uses."""
    named = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", message)
    if named:
        return named.group(1)
    return next((g for g in _pickle_globals(data)
                 if g.split(".", 1)[0] not in _STATE_MODULES), None)


def _pickle_globals(data: bytes) -> list[str]:
    """`module.name` of every global the pickles of a torch file import, read from the
    opcodes without executing anything (zip format: */data.pkl; legacy: the whole stream)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            streams = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
    except zipfile.BadZipFile:
        streams = [data]
    found: list[str] = []
    for stream in streams:
        f = io.BytesIO(stream)
        while f.tell() < len(stream):  # legacy files are several pickles back to back
            strings: list[Any] = []   # values pushed, for STACK_GLOBAL (protocol 4+)
            memo: dict[int, Any] = {}
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", ".", 1))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif "UNICODE" in op.name:
                        strings.append(arg)
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                        memo[int(arg)] = strings[-1] if strings else None
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = strings[-1] if strings else None
                    elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                        strings.append(memo.get(int(arg)))
            except Exception:  # a truncated or non-pickle tail: keep what was found
                break
    return found
