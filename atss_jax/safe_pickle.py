"""Reading pickled weights without running code from the file.

A pickle names callables (``module.name``) that the reader calls while loading, so an untrusted file
can run anything (``os.system``, ``builtins.exec``). ``loads`` admits only the few globals that
numeric arrays and plain containers need, and refuses every other by name, before anything is called:
numpy arrays and scalars (numpy 1.x names ``numpy.core.*``, 2.x ``numpy._core.*``, and Python 2's, as
Detectron's Caffe2 pickles were written), numpy dtypes other than ``object`` (an object array can
hold arbitrary objects), ``collections.OrderedDict``, and the containers and byte-string helper that
pickles of protocol 3 and lower name (``set``, ``frozenset``, ``bytearray``, ``_codecs.encode``). Lists,
tuples, dicts, strings, numbers and newer protocols' bytes and sets need no global at all.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import pickle
from typing import Any

import numpy as np
from etils import epath

from atss_jax import errors


class UnsafePickleError(errors.Refusal, pickle.UnpicklingError):
    """The pickle names a global outside the admitted ones (it would call it while loading)."""


def _numpy_core(module: str) -> Any:
    """numpy's ``_core.<module>`` (numpy 2) or ``core.<module>`` (numpy 1), without importing the
    deprecated alias."""
    core = getattr(np, "_core", None) or np.core
    return getattr(core, module)


def _dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the numeric and string kinds only."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"refusing numpy dtype {dtype!r}: object arrays can hold arbitrary objects")
    return dtype


def _admitted() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object ``loads`` hands the unpickler for that global."""
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    admitted = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Protocols below 4 name these containers (protocol 4 and later have opcodes for sets).
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        # Protocol 2 from Python 3 writes bytes as _codecs.encode(latin-1 text, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        admitted[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        admitted[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        admitted[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return admitted


_ADMITTED = _admitted()


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come from ``_ADMITTED`` only; nothing is imported."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__``, ``copy_reg``) as the standard unpickler maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': only numpy arrays, numpy dtypes and plain "
                "containers are admitted (loading it would call code named by the file)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}: plain pickles of arrays have none")


def loads(data: bytes, source: str = "pickle", encoding: str = "latin1") -> Any:
    """The object pickled in ``data``, built from admitted globals only.

    Args:
      data: the pickle's bytes (any protocol, Python 2 or 3).
      source: what ``data`` is (a file name), for error messages.
      encoding: how Python 2 byte strings are decoded; "latin1" keeps numpy's raw array bytes intact.

    Raises:
      UnsafePickleError: naming the first global outside the admitted ones (nothing it names was called).
      ValueError: ``data`` is not a readable pickle.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{source}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        raise ValueError(f"{source} is not a readable pickle: {error}") from error


def load(path: str | epath.PathLike) -> Any:
    """``loads`` of the file at ``path`` (which may be a bucket, ``gs://...``)."""
    file = epath.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"pickle file {str(path)!r} does not exist")
    return loads(file.read_bytes(), source=repr(str(path)))
