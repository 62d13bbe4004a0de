"""The numpy-only unpickler: round-trips what numpy pickles, refuses everything else without running it."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from airflow_provider_mmprep.safepickle import UnsafePickleError, describe_arrays, safe_loads

ARRAYS = {
    "autoencoderkl_image": np.random.default_rng(0).standard_normal((8, 4, 4)).astype(np.float16),
    "clip-vit-large-patch14_text": np.ones((80, 768), np.float32),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    "empty_rows": np.zeros((0, 16), np.float16),
    "structured": np.array([(1, 2.0)], dtype=[("x", "i4"), ("y", "f8")]),
    "zero_d": np.array(3.5),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_round_trips_every_protocol(protocol: int) -> None:
    loaded = safe_loads(pickle.dumps(ARRAYS, protocol=protocol))
    assert loaded.keys() == ARRAYS.keys()
    for key, expected in ARRAYS.items():
        assert loaded[key].dtype == expected.dtype and loaded[key].shape == expected.shape
        np.testing.assert_array_equal(loaded[key], expected)


class _RunsCode:
    def __reduce__(self):  # what a malicious pickle would do
        return (os.system, ("touch SHOULD_NOT_EXIST",))


@pytest.mark.parametrize("payload, message", [
    ({"a": _RunsCode()}, "refused global"),
    ({"a": np.array([1, "x"], dtype=object)}, "Python objects"),
    ([np.zeros(2)], "expected a dict"),
    ({1: np.zeros(2)}, "str keys"),
    ({"a": np.float32(1)}, "expected a numpy.ndarray"),
])
def test_refuses_non_array_pickles(payload, message, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError, match=message):
        safe_loads(pickle.dumps(payload))
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


def test_refuses_codecs_other_than_latin1() -> None:
    # a hand-made protocol-2 pickle calling _codecs.encode("x", "zlib_codec")
    data = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\n\x00\x00\x00zlib_codec\x86R."
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_loads(data)


def test_truncated_and_garbage_data_raise_unsafe_pickle_error() -> None:
    good = pickle.dumps(ARRAYS)
    for data in (good[: len(good) // 2], b"not a pickle", b""):
        with pytest.raises(UnsafePickleError):
            safe_loads(data)


def test_describe_arrays() -> None:
    assert describe_arrays({"k": np.zeros((8, 64, 64), np.float16)}) == {
        "k": {"shape": [8, 64, 64], "dtype": "float16"}}
