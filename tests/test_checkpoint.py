"""Reading checkpoints (slta.io.checkpoint.Checkpoint): tensors are private maps of the files' bytes,
read in when opened. Checked against safetensors' own loader, bit for bit."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from slta.io.checkpoint import Checkpoint, CheckpointError, _populate


def odd_checkpoint(folder):
    """Tensors of several dtypes and odd sizes, so most data offsets are not page- or even 4-byte-aligned."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.weight": torch.randn(3, 5, generator=g).bfloat16(),         # 30 bytes: the next offset is odd-aligned
        "b.weight": torch.randn(7, generator=g).half(),
        "c.weight": torch.randn(1000, 33, generator=g),                 # crosses several pages
        "d.mask": torch.rand(9, generator=g) > 0.5,                     # 1-byte items
        "e.weight": torch.randn(5000, 7, generator=g).double(),
        "f.empty": torch.zeros(0, 4),
        "g.weight": torch.randn(2049, generator=g).bfloat16(),
    }
    folder.mkdir()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return sd


def test_read_tensors_equal_safetensors_load_file_bit_for_bit(tmp_path):
    odd_checkpoint(tmp_path / "m")
    ref = load_file(tmp_path / "m" / "model.safetensors")
    ck = Checkpoint(tmp_path / "m")
    got = ck.get_many(ck.names())
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape, n
        assert torch.equal(got[n].view(-1).view(torch.uint8) if t.numel() else got[n], t.view(-1).view(torch.uint8)
                           if t.numel() else t), n
    # row blocks read only their bytes, at any start
    for lo, hi in ((0, 1), (17, 400), (999, 1000), (5, 5)):
        assert torch.equal(ck.get_rows("c.weight", lo, hi), ref["c.weight"][lo:hi])
    assert torch.equal(ck.get_rows("e.weight", 4096, 5000), ref["e.weight"][4096:5000])


def test_writing_to_a_read_tensor_never_changes_the_file(tmp_path):
    odd_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    before = f.read_bytes()
    ck = Checkpoint(tmp_path / "m")
    t = ck.get("c.weight")
    t.mul_(3.0).add_(1.0)  # in place: copy-on-write pages, private to this tensor
    assert f.read_bytes() == before
    assert torch.equal(ck.get("c.weight"), load_file(f)["c.weight"])  # a second read sees the file, not the edit


def test_a_file_that_shrinks_after_opening_is_a_named_error_not_a_crash(tmp_path):
    """A map of bytes past the end of a file would kill the process with SIGBUS on first touch."""
    odd_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    ck = Checkpoint(tmp_path / "m")  # the header is checked against the size here
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"g\.weight.*truncated"):
        ck.get("g.weight")


def test_populate_reports_a_range_past_the_end_of_the_file(tmp_path):
    """MADV_POPULATE_READ fails with EFAULT (not SIGBUS) where the mapped file has no bytes."""
    f = tmp_path / "x.bin"
    f.write_bytes(b"\1" * 3 * mmap.PAGESIZE)
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 3 * mmap.PAGESIZE, access=mmap.ACCESS_COPY)
        t = torch.frombuffer(m, dtype=torch.uint8)
        os.truncate(f, mmap.PAGESIZE)  # the file shrinks under the map (another process, a full disk)
        assert _populate(t.data_ptr(), mmap.PAGESIZE) == 0
        err = _populate(t.data_ptr(), 3 * mmap.PAGESIZE)
        if err == 0:  # a kernel without MADV_POPULATE_READ (before 5.14) only gets a read-ahead hint
            pytest.skip("this kernel has no MADV_POPULATE_READ; the read-ahead hint cannot report errors")
        assert err == errno.EFAULT
        del t
        m.close()


def test_read_tensors_are_unmapped_when_freed(tmp_path):
    """Each tensor's map lives as long as the tensor: nothing of a released group stays mapped."""
    odd_checkpoint(tmp_path / "m")
    path = str((tmp_path / "m" / "model.safetensors").resolve())

    def maps() -> int:
        with open("/proc/self/maps") as fh:
            return sum(path in line for line in fh)

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    ck = Checkpoint(tmp_path / "m")
    group = ck.get_many(ck.names())
    assert maps() >= 5
    view = group["c.weight"][10:20]  # a view keeps its tensor's map, and only that one
    del group
    assert maps() == 1
    del view
    assert maps() == 0
