"""Load ``.pickle`` members (``dict[str, numpy.ndarray]``) without running arbitrary code.

webdataset and NeMo decode ``.pickle`` with ``pickle.loads``, which executes whatever a crafted file asks
for. Our readers (``mmprep inspect``, stage checks, tests) use :func:`safe_loads` instead: its unpickler's
``find_class`` admits only the names numpy itself emits when pickling arrays, dtypes and scalars (numpy
1.x ``numpy.core.*`` and 2.x ``numpy._core.*`` spellings), and the result must be a dict of ``str`` to
ndarrays whose dtype holds no Python objects. Anything else raises :class:`UnsafePickleError`.

Writers keep using ``pickle.dumps`` (any protocol): that is what NeMo's training loader expects.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, Callable

import numpy as np

__all__ = ["UnsafePickleError", "safe_loads", "safe_load_file", "safe_loads_plain", "describe_arrays"]


class UnsafePickleError(pickle.UnpicklingError):
    """The data is not a pickle of ``dict[str, ndarray]`` built from numpy's own reconstruction names."""


def _numpy_private(name: str) -> Any:
    """numpy's private reconstruction helpers, wherever this numpy version keeps them."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "_frombuffer": numeric._frombuffer}[name]


_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: pickle protocols 0-2 use it only to turn latin-1 text into bytes.

    Other codecs (zlib, bz2, ...) are refused so the name cannot be used for anything but that.
    """
    if not isinstance(text, str) or encoding.lower() not in _LATIN1:
        raise UnsafePickleError(f"_codecs.encode is only allowed for latin1 text, got codec {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes``: protocols 0-2 pickle an empty ``bytes`` as the call ``bytes()``."""
    if args:
        raise UnsafePickleError("bytes(...) with arguments is not allowed")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _numpy_private("_reconstruct")
        allowed[(f"{package}.multiarray", "scalar")] = _numpy_private("scalar")
        allowed[(f"{package}.numeric", "_frombuffer")] = _numpy_private("_frombuffer")
    return allowed


_ALLOWED = _allowed_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused global {module}.{name}: only numpy array reconstruction "
                                    f"names are allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: not allowed in array pickles")


def safe_loads(data: bytes) -> dict[str, np.ndarray]:
    """Unpickle ``data`` that must be a ``dict[str, ndarray]`` (non-object dtypes); raise otherwise."""
    try:
        result = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated data, bad opcodes, numpy refusing bad state...
        raise UnsafePickleError(f"not a valid array pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, dict):
        raise UnsafePickleError(f"expected a dict of arrays, got {type(result).__name__}")
    for key, value in result.items():
        if not isinstance(key, str):
            raise UnsafePickleError(f"expected str keys, got {type(key).__name__} {key!r}")
        if type(value) is not np.ndarray:
            raise UnsafePickleError(f"key {key!r}: expected a numpy.ndarray, got {type(value).__name__}")
        if value.dtype.hasobject:
            raise UnsafePickleError(f"key {key!r}: arrays of Python objects are not allowed")
    return result


def safe_load_file(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as handle:
        return safe_loads(handle.read())


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``{key: {"shape": [...], "dtype": "float16"}}``: what inspect and manifests report per encoding."""
    return {key: {"shape": list(value.shape), "dtype": str(value.dtype)} for key, value in arrays.items()}


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refused global {module}.{name}: plain data only")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id")


_PLAIN = (dict, list, tuple, str, int, float, bool, type(None), bytes)


def safe_loads_plain(data: bytes) -> Any:
    """Unpickle plain data (dicts, lists, strings, numbers) such as ``wdinfo.pkl``; no globals at all."""
    try:
        result = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise UnsafePickleError(f"not a valid pickle: {type(exc).__name__}: {exc}") from None
    stack = [result]
    while stack:  # sets and frozensets need no globals either; refuse anything that is not plain
        item = stack.pop()
        if not isinstance(item, _PLAIN):
            raise UnsafePickleError(f"unexpected {type(item).__name__} in plain pickle")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return result
