"""read_range / read_header against safetensors' own loader: every dtype NumPy has, every
offset, and reads that touch no byte outside the range asked for."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from narun.checkpoint import CheckpointError, _range, read_header, read_range

DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?"]


def tensors(seed=0):
    """One tensor per dtype, of odd sizes (so data offsets are not aligned to anything),
    plus a scalar and an empty tensor."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, code in enumerate(DTYPES):
        dt = np.dtype(code)
        shape = (3 + i, 5) if i % 2 else (7 + 2 * i,)
        if dt.kind == "f":
            a = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            a = rng.random(shape) > 0.5
        else:
            info = np.iinfo(dt)
            a = rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
        out[f"t{i}.{dt.name}"] = a
    out["scalar"] = np.array(2.5, np.float32)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


@pytest.fixture
def stfile(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file(tensors(), str(path), {"note": "kept"})
    return path


def test_every_tensor_and_every_range_equals_safetensors_loader(stfile):
    expected = safetensors.numpy.load_file(str(stfile))
    infos, meta = read_header(stfile)
    assert meta == {"note": "kept"}
    assert set(infos) == set(expected)
    rng = np.random.default_rng(1)
    for name, want in expected.items():
        flat = want.reshape(-1)
        assert infos[name].shape == want.shape and infos[name].dtype == want.dtype
        whole = read_range(stfile, name)
        assert whole.dtype == want.dtype and whole.tobytes() == flat.tobytes(), name
        ranges = [(0, 0), (flat.size, flat.size), (0, flat.size)]
        if flat.size > 1:
            ranges += [(0, 1), (flat.size - 1, flat.size)]
            ranges += [tuple(sorted(rng.integers(0, flat.size + 1, 2))) for _ in range(5)]
        for start, stop in ranges:
            got = read_range(stfile, name, int(start), int(stop))
            assert got.shape == (stop - start,) and got.dtype == want.dtype
            assert got.tobytes() == flat[start:stop].tobytes(), (name, start, stop)
            again = read_range(stfile, name, int(start), int(stop), header=infos)
            assert again.tobytes() == got.tobytes()


def test_a_read_touches_no_byte_outside_its_range(stfile, monkeypatch):
    """Only the header and the range's own bytes are read, and every other byte of the data
    (other tensors, and the rest of this one) may be garbage."""
    name, start, stop = "t1.float32", 7, 19
    want = safetensors.numpy.load_file(str(stfile))[name].reshape(-1)[start:stop].copy()
    infos, _ = read_header(stfile)
    lo, hi = infos[name].begin + start * 4, infos[name].begin + stop * 4
    data_begins = min(i.begin for i in infos.values())
    data = bytearray(stfile.read_bytes())
    data[data_begins:lo] = b"\xff" * (lo - data_begins)  # NaN in every float32 lane
    data[hi:] = b"\xff" * (len(data) - hi)
    stfile.write_bytes(bytes(data))

    reads: list[tuple[int, int]] = []

    def recording_open(*args, **kwargs):
        return Recorder(open(*args, **kwargs), reads)  # noqa: SIM115 (Recorder closes it)

    monkeypatch.setattr(_range, "open", recording_open, raising=False)
    np.testing.assert_array_equal(read_range(stfile, name, start, stop), want)
    outside = [(a, b) for a, b in reads if b > a and not (b <= data_begins
                                                           or lo <= a and b <= hi)]
    assert not outside, f"read bytes {outside} outside the header and [{lo}, {hi})"
    assert sum(b - a for a, b in reads if a >= lo) == hi - lo


class Recorder:
    """A file that records the byte ranges read through it."""

    def __init__(self, f, reads):
        self.f, self.reads = f, reads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, attr):
        return getattr(self.f, attr)

    def read(self, n=-1):
        at = self.f.tell()
        got = self.f.read(n)
        self.reads.append((at, at + len(got)))
        return got

    def readinto(self, buf):
        at = self.f.tell()
        got = self.f.readinto(buf)
        self.reads.append((at, at + (got or 0)))
        return got


def test_out_is_filled_in_place_and_checked(stfile):
    want = safetensors.numpy.load_file(str(stfile))["t1.float32"].reshape(-1)
    buf = np.zeros(30, np.float32)
    got = read_range(stfile, "t1.float32", 4, 14, out=buf[10:20])
    assert got.base is buf or np.shares_memory(got, buf)
    np.testing.assert_array_equal(buf[10:20], want[4:14])
    assert not buf[:10].any() and not buf[20:].any()
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous float32 array "
                                         "of 10 elements"):
        read_range(stfile, "t1.float32", 4, 14, out=np.zeros(10, np.float64))
    with pytest.raises(ValueError, match="out must be"):
        read_range(stfile, "t1.float32", 4, 14, out=buf[::3][:10])


def test_errors_name_the_file_the_tensor_and_what_is_wrong(stfile, tmp_path):
    with pytest.raises(CheckpointError, match=r"t.safetensors: no tensor 'nope' \(it holds 14"):
        read_range(stfile, "nope")
    with pytest.raises(ValueError, match=r"\[3, 99\) is not a range of .*'t0.float64', which "
                                         r"has 7 elements"):
        read_range(stfile, "t0.float64", 3, 99)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(stfile.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="cut.safetensors: tensor .* do not fit it or a "
                                              "file of"):
        read_range(cut, "t0.float64")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        read_header(short)
    bf16 = tmp_path / "bf16.safetensors"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    bf16.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="'w' has dtype 'BF16', which NumPy cannot hold"):
        read_header(bf16)
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        read_header(tmp_path / "missing.safetensors")
