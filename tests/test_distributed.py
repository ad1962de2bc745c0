"""Two gloo processes with half a batch each end with the codebook of one process with all of it."""

import os
import sys

import pytest
import torch

from conftest import ROOT, accelerate_launch, run


@pytest.mark.parametrize("codes", ["plain", "low-dim", "residual", "residual-shared", "multiscale"])
def test_two_processes_match_one_process_codebook(tmp_path, codes):
    """Residual levels (3, with quantizer dropout; a codebook each or one shared) and residual scales hold
    it as one level does."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    option = [] if codes == "plain" else [codes]
    run([sys.executable, "tests/scripts/quantizer_steps.py", str(one), *option])
    accelerate_launch("tests/scripts/quantizer_steps.py", str(two), *option, num_processes=2)
    ref = torch.load(one / "rank0.pt")
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert ref["restarted"] > 0, "the run must exercise dead-code restarts"
    assert r0["restarted"] == r1["restarted"] == ref["restarted"]
    keys = [k for k in ref if k.endswith(("codebook", "ema_count", "ema_sum"))]
    assert len(keys) == (9 if codes == "residual" else 3), keys
    for key in keys:
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
        assert torch.allclose(r0[key], ref[key], atol=1e-5), f"{key} differs from the one-process run"


@pytest.mark.parametrize("name,kind,processes", [("1gpu", "NO", 1), ("8gpu_ddp", "MULTI_GPU", 8),
                                                 ("8gpu_fsdp", "FSDP", 8), ("2nodes", "MULTI_GPU", 16)])  # fmt: skip
def test_shipped_accelerate_configs_load(name, kind, processes):
    """The example configs of the README parse with accelerate's own loader, as `accelerate launch` reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == processes
    assert config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
