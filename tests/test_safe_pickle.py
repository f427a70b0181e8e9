"""safe_pickle reads arrays and containers from any protocol and refuses, by name, any pickle that would run code."""

import collections
import io
import os
import pickle

import numpy as np
import pytest

from atss_jax import safe_pickle


class _MakesMarker:
    """Unpickling this calls ``os.mkdir(marker)``: the shape of a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Execs:
    def __reduce__(self):
        return exec, ("raise SystemExit('ran')",)


def python2_pickle(blobs: dict[str, np.ndarray]) -> bytes:
    """``{"blobs": blobs}`` (float32 arrays) as Python 2's ``cPickle.dump(..., protocol=2)`` with numpy 1.x
    writes it, opcode by opcode (pickletools' names): byte strings (``SHORT_BINSTRING``/``BINSTRING``), and
    arrays through ``numpy.core.multiarray._reconstruct`` with the raw bytes in their state."""

    def string(value: bytes) -> bytes:
        return (b"U" + bytes([len(value)]) if len(value) < 256 else b"T" + len(value).to_bytes(4, "little")) + value

    def small_int(value: int) -> bytes:
        return b"K" + bytes([value])

    out = [b"\x80\x02", b"}", string(b"blobs"), b"}"]
    for name, array in blobs.items():
        assert array.dtype == np.float32
        shape = b"(" + b"".join(b"J" + d.to_bytes(4, "little", signed=True) for d in array.shape) + b"t"
        dtype = (b"cnumpy\ndtype\n" + string(b"f4") + small_int(0) + small_int(1) + b"\x87R"
                 + b"(" + small_int(3) + string(b"<") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + small_int(0) + b"tb")
        out += [string(name.encode()),
                b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", small_int(0), b"\x85",
                string(b"b"), b"\x87R",
                b"(", small_int(1), shape, dtype, b"\x89", string(array.tobytes()), b"tb",
                b"s"]
    out += [b"s."]
    return b"".join(out)


def test_python2_detectron_pickle_reads_as_arrays():
    blobs = {"conv1_w": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
             "res_conv1_bn_s": np.ones(2, np.float32)}
    data = python2_pickle(blobs)
    # The hand-written stream is what the standard reader (which trusts it) makes of it too.
    trusted = pickle.loads(data, encoding="latin1")
    loaded = safe_pickle.loads(data)
    assert set(loaded) == {"blobs"} and set(loaded["blobs"]) == set(blobs)
    for name, value in blobs.items():
        assert loaded["blobs"][name].dtype == np.float32
        np.testing.assert_array_equal(loaded["blobs"][name], value)
        np.testing.assert_array_equal(trusted["blobs"][name], value)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_python3_protocols_round_trip(protocol):
    value = collections.OrderedDict(
        arrays={"f": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), "i": np.arange(4, dtype=np.int64),
                "fortran": np.asfortranarray(np.eye(3))},
        scalars=(np.float32(2.5), 3, 1.5, "text", b"bytes", None, True),
        nested=[{1, 2}, frozenset({3})],
    )
    loaded = safe_pickle.loads(pickle.dumps(value, protocol=protocol))
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == ["arrays", "scalars", "nested"]
    for name, array in value["arrays"].items():
        assert loaded["arrays"][name].dtype == array.dtype
        np.testing.assert_array_equal(loaded["arrays"][name], array)
    assert loaded["scalars"] == value["scalars"] and loaded["nested"] == value["nested"]


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_code_is_refused_by_name_and_never_runs(tmp_path, protocol):
    live = tmp_path / "ran_when_trusted"
    pickle.loads(pickle.dumps(_MakesMarker(live), protocol=protocol))
    assert live.is_dir()  # the payload is real: the standard reader runs it

    marker = tmp_path / "marker"
    with pytest.raises(safe_pickle.UnsafePickleError, match=rf"weights\.pkl.*'{os.mkdir.__module__}\.mkdir'"):
        safe_pickle.loads(pickle.dumps({"blobs": {"x": np.ones(2)}, "y": _MakesMarker(marker)}, protocol=protocol),
                          source="weights.pkl")
    assert not marker.exists()
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"'builtins\.exec'"):
        safe_pickle.loads(pickle.dumps(_Execs(), protocol=protocol))


def test_object_arrays_and_persistent_ids_are_refused(tmp_path):
    with pytest.raises(safe_pickle.UnsafePickleError, match="object"):
        safe_pickle.loads(pickle.dumps(np.array([1, "a"], dtype=object)))

    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, str) else None

    buffer = io.BytesIO()
    WithPersistentIds(buffer, protocol=2).dump(["a"])
    with pytest.raises(safe_pickle.UnsafePickleError, match="persistent"):
        safe_pickle.loads(buffer.getvalue())


def test_unreadable_and_absent_files_are_named(tmp_path):
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(ValueError, match=r"broken\.pkl.*not a readable pickle"):
        safe_pickle.load(broken)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        safe_pickle.load(tmp_path / "nowhere.pkl")
