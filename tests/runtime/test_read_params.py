"""kiln/runtime/model_runner.py ``read_safetensors``: the weights read straight into 64-byte aligned tensors,
one copy (the loader the runner uses), equal to what safetensors itself reads, in every dtype an artifact
holds; a damaged file is a one-line ArtifactError."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import ArtifactError
from kiln.runtime.model_runner import read_safetensors

TENSORS = {"w": torch.randn(3, 5), "half": torch.randn(7).half(), "bf": torch.randn(2, 3).to(torch.bfloat16),
           "qweight": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32),
           "zeros": torch.randint(0, 16, (3,), dtype=torch.uint8), "w8": torch.randint(-127, 128, (5,), dtype=torch.int8),
           "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}


@pytest.fixture
def params_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "params.safetensors"
    save_file(TENSORS, str(path))
    return path


def test_reads_every_dtype_aligned(params_file):
    names = list(TENSORS)[::-1]  # any order
    got = dict(read_safetensors(params_file, names))
    assert list(got) == names
    for name, want in TENSORS.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
        assert got[name].numel() == 0 or got[name].data_ptr() % 64 == 0, name


def test_missing_and_truncated_are_artifact_errors(params_file, tmp_path):
    with pytest.raises(ArtifactError, match="lacks nope"):
        list(read_safetensors(params_file, ["w", "nope"]))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(params_file.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="truncated"):
        list(read_safetensors(cut, list(TENSORS)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        list(read_safetensors(junk, ["w"]))
