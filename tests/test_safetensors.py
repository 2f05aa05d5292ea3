"""Our safetensors reader and writer: exact round trips, F16/BF16 widening, and every malformed
header or truncated file refused with a message naming the file and the tensor."""
import json
import os

import numpy as np
import pytest

from minisft import safetensors as st
from minisft.errors import MinisftError
from tests.hf_files import to_bf16_bits, write_raw, write_safetensors


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_round_trip_is_bit_exact_and_memory_mapped(tmp_path, rng):
    tensors = {"wte.weight": rng.standard_normal((7, 5), dtype=np.float32),
               "h.0.ln_1.bias": rng.standard_normal(5, dtype=np.float32),
               "scalar": np.float32(rng.standard_normal()),
               "empty": np.zeros((0, 3), np.float32),
               "from_float64": rng.standard_normal((2, 3, 4))}
    st.save(tmp_path / "m.safetensors", tensors, metadata={"format": "pt", "note": "x"})
    out, meta = st.load(tmp_path / "m.safetensors")
    assert meta == {"format": "pt", "note": "x"}
    assert list(out) == list(tensors)  # data order is the order written
    for name, a in tensors.items():
        assert out[name].dtype == np.float32 and out[name].shape == np.shape(a)
        np.testing.assert_array_equal(out[name], np.asarray(a, np.float32))
    assert isinstance(out["wte.weight"].base, np.memmap) and not out["wte.weight"].flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    _, start, _ = st.read_header(tmp_path / "m.safetensors")
    assert start % 8 == 0  # header padded so the data section is aligned


def test_reads_f16_and_bf16_widened_exactly(tmp_path, rng):
    a = rng.standard_normal((3, 4), dtype=np.float32)
    b = rng.standard_normal(6, dtype=np.float32)
    write_safetensors(tmp_path / "h.safetensors", {"a": ("F16", a), "b": ("BF16", b), "c": ("F32", a)})
    out, meta = st.load(tmp_path / "h.safetensors")
    assert meta == {}
    assert out["a"].dtype == np.float16
    np.testing.assert_array_equal(out["a"], a.astype(np.float16))
    assert out["b"].dtype == np.float32
    expect_b = (to_bf16_bits(b).astype(np.uint32) << 16).view(np.float32)  # bf16 = top half of float32
    np.testing.assert_array_equal(out["b"], expect_b)
    assert np.max(np.abs(out["b"] - b) / np.abs(b)) < 2 ** -7  # truncation to 8 mantissa bits
    np.testing.assert_array_equal(out["c"], a)


def test_failed_write_keeps_the_old_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "m.safetensors"
    st.save(path, {"a": np.ones(3, np.float32) * 2})
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        st.save(path, {"a": rng.standard_normal(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (header object or raw bytes, data bytes, the words the error must contain)
BAD = {
    "unsupported dtype": ({"w": _entry(dtype="F64", offsets=(0, 16))}, 16, ["'w'", "F64", "not supported"]),
    "integer dtype": ({"w": _entry(dtype="I32")}, 8, ["'w'", "I32"]),
    "shape not ints": ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, ["'w'", "shape"]),
    "negative shape": ({"w": _entry(shape=(-2,))}, 8, ["'w'", "shape"]),
    "offsets reversed": ({"w": _entry(offsets=(8, 0))}, 8, ["'w'", "data_offsets"]),
    "offsets wrong length": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, ["'w'", "data_offsets"]),
    "missing field": ({"w": {"dtype": "F32", "shape": [2]}}, 8, ["'w'", "data_offsets"]),
    "size mismatch": ({"w": _entry(shape=(3,))}, 8, ["'w'", "needs 12 bytes", "hold 8"]),
    "past the end": ({"w": _entry(offsets=(0, 8))}, 4, ["'w'", "past the end", "truncated"]),
    "overlap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12, ["'b'", "overlaps", "'a'"]),
    "gap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20, ["'b'", "gap"]),
    "trailing bytes": ({"a": _entry(offsets=(0, 8))}, 12, ["end at byte 8", "holds 12"]),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": _entry()}, 8, ["__metadata__"]),
    "not an object": (b"[1, 2]", 0, ["not a JSON object"]),
    "not JSON": (b"{not json", 0, ["not valid UTF-8 JSON"]),
    "not UTF-8": (b'{"\xff": 1}', 0, ["not valid UTF-8 JSON"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_headers_are_refused(tmp_path, case):
    header, n_data, words = BAD[case]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    write_raw(path, raw, np.random.default_rng(0).bytes(n_data))
    with pytest.raises(MinisftError) as e:
        st.load(path)
    msg = str(e.value)
    assert str(path) in msg and "not a valid safetensors file" in msg
    for w in words:
        assert w in msg


def test_short_and_garbage_files_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(MinisftError, match="too short"):
        st.load(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # an absurd header length
    with pytest.raises(MinisftError, match="not plausible"):
        st.load(path)
    path.write_bytes((500).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(MinisftError, match="runs past the end of the file"):
        st.load(path)


def test_truncated_file_names_the_cut_tensor(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    st.save(path, {"first": rng.standard_normal(100), "last": rng.standard_normal(100)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MinisftError, match=r"tensor 'last'.*truncated"):
        st.load(path)


def test_agrees_with_the_reference_implementation(tmp_path, rng):
    """Where Hugging Face's `safetensors` package is importable: files cross in both directions."""
    ref = pytest.importorskip("safetensors.numpy", reason="the reference `safetensors` package is not installed")
    tensors = {"a": rng.standard_normal((4, 3), dtype=np.float32), "b": rng.standard_normal(5, dtype=np.float32),
               "h": rng.standard_normal((2, 2)).astype(np.float16)}
    ref.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours, meta = st.load(tmp_path / "ref.safetensors")
    assert meta == {"format": "pt"}
    for k, a in tensors.items():
        assert ours[k].dtype == a.dtype
        np.testing.assert_array_equal(ours[k], a)
    st.save(tmp_path / "ours.safetensors", {k: tensors[k] for k in ("a", "b")}, metadata={"format": "pt"})
    back = ref.load_file(str(tmp_path / "ours.safetensors"))
    for k in ("a", "b"):
        np.testing.assert_array_equal(back[k], tensors[k])
