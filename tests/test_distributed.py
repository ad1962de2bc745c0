"""Two gloo processes with half a batch each end with the codebook of one process with all of it."""

import sys

import pytest
import torch

from conftest import accelerate_launch, run


@pytest.mark.parametrize("codes", ["plain", "low-dim"])
def test_two_processes_match_one_process_codebook(tmp_path, codes):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    option = ["low-dim"] if codes == "low-dim" else []
    run([sys.executable, "tests/scripts/quantizer_steps.py", str(one), *option])
    accelerate_launch("tests/scripts/quantizer_steps.py", str(two), *option, num_processes=2)
    ref = torch.load(one / "rank0.pt")
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert ref["restarted"] > 0, "the run must exercise dead-code restarts"
    assert r0["restarted"] == r1["restarted"] == ref["restarted"]
    for key in ("codebook", "ema_count", "ema_sum"):
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
        assert torch.allclose(r0[key], ref[key], atol=1e-5), f"{key} differs from the one-process run"
