"""The demo's path with the tiny presets through the real command lines; kills at the worst moments."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import torch
from safetensors.torch import load_file

from conftest import ROOT, python_m, run
from sample import ClassConditionalPipeline
from tokenizer import VQVAE


def test_demo_path_writes_every_artifact_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    args = ["demo.py", "--out", str(out), "--preset", "tiny", "--max-samples", "2048",
            "--tokenizer-steps", "40", "--prior-steps", "40", "--classifier-steps", "20", "--per-class", "8"]  # fmt: skip
    proc = run([sys.executable, *args])
    for name in ("tokenizer", "prior", "classifier", "resnet", "contrastive"):
        files = set(os.listdir(out / name))
        assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= files, files
        assert name in ("tokenizer", "prior") or "images" not in files, files
    assert (out / "prior" / "generation_config.json").exists()
    from train.loop import resolve_precision

    for name in ("tokenizer", "prior", "classifier"):  # --mixed-precision auto, as this machine settles it, in each card
        precision, why = resolve_precision("auto", name)
        assert f"| mixed precision | {precision} ({why}) |" in (out / name / "README.md").read_text()
    assert {"dataset_dict.json", "vqgpt_codes.json", "train", "test"} <= set(os.listdir(out / "codes"))
    samples = datasets.load_dataset("imagefolder", data_dir=str(out / "samples"), split="train")
    assert len(samples) == 80 and len(set(samples["label"])) == 10
    assert (out / "samples" / "grid.png").exists()
    assert "accelerate.commands.launch" in proc.stdout and "-m train.tokenizer" in proc.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_samples"] == 80 and 0 <= report["accuracy"] <= 1 and report["fd_floor"] > 0, report
    assert [s["space"] for s in report["spaces"]] == ["vgg", "resnet", "contrastive-resnet"] and report["detail"] > 0
    for line in ("tokenizer  ", "test PSNR", "codebook usage", "bits/token", "the reference classifier's test accuracy",
                 "the contrastive encoder's positive top-1", "samples    FD / floor: vgg", "contrastive-resnet", "detail", "grid  "):  # fmt: skip
        assert line in proc.stdout, line
    pipe = ClassConditionalPipeline.from_pretrained(str(out / "prior"))
    assert pipe.prior.config.model_type == "llama"  # the demo's prior (docs/recipe.md)
    assert pipe.tokenizer.num_levels == 8 and pipe.info.code_layout.num_levels == 1, "8 residual levels, the prior over the first"
    assert pipe(["Bag"], seed=0).shape == (1, 1, 28, 28)

    again = run([sys.executable, *args])
    assert again.stdout.count("reusing") == 6, again.stdout  # tokenizer, codes, prior and the three networks are not retrained

    # --grid 14: the 14x14 recipe (docs/recipe.md) through the same chain; the evaluation's networks are those above.
    out14 = tmp_path / "demo14"
    for name in ("classifier", "resnet", "contrastive"):
        shutil.copytree(out / name, out14 / name)
    small = ["--max-samples", "1024", "--tokenizer-steps", "20", "--prior-steps", "20", "--per-class", "4"]  # the chain, not its quality
    grid14 = run([sys.executable, "demo.py", "--out", str(out14), "--grid", "14", *args[3:], *small])
    assert grid14.stdout.count("reusing") == 3 and "--num-downsamples 1 --num-codes 1024 --learning-rate 4e-3" in grid14.stdout
    assert "gpt2, 20 steps" in grid14.stdout
    pipe = ClassConditionalPipeline.from_pretrained(str(out14 / "prior"))
    assert pipe.prior.config.model_type == "gpt2" and pipe.info.seq_len == 196 and pipe.info.num_codes == 1024
    assert pipe.sampling_settings() == dict(guidance_scale=2.5, temperature=1.0, top_k=200, top_p=1.0, guidance_schedule="linear",
                                            deep_temperature=None, deep_top_k=None)  # fmt: skip
    assert "sampling at " in grid14.stdout and json.loads((out14 / "evaluation.json").read_text())["num_samples"] == 40
    # The 7x7 folder is not reused for the 14x14 chain: its recorded settings differ, and nothing runs.
    other = run([sys.executable, "demo.py", "--out", str(out), "--grid", "14", *args[3:]], check=False)
    assert other.returncode == 2 and "$ " not in other.stdout, other.stdout
    assert "holds a demo trained with other settings (grid 7 -> 14, prior_arch llama -> gpt2, tokenizer_options --learning-rate 4e-3 --quantizer residual" in other.stderr.splitlines()[-1], other.stderr


TOK = ["--preset", "fashion-mnist", "--max-train-samples", "512", "--max-eval-samples", "64", "--train-batch-size", "16",
       "--max-train-steps", "12", "--checkpointing-steps", "1", "--checkpoints-total-limit", "3", "--eval-steps", "100"]  # fmt: skip


def _kill_while_writing_a_checkpoint(out, attempts=5):
    """Start training and SIGKILL it while a checkpoint is half written (its .tmp folder exists)."""
    ckpts = out / "checkpoints"
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "train.tokenizer", *TOK, "--output-dir", str(out)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while proc.poll() is None:
            if ckpts.is_dir() and any(d.startswith(".tmp-checkpoint-") and d != ".tmp-checkpoint-1" for d in os.listdir(ckpts)):  # fmt: skip
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if any(d.startswith(".tmp-") for d in os.listdir(ckpts)):
                    return
            time.sleep(0.001)
    raise AssertionError(f"never caught a checkpoint being written in {attempts} runs")


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    _kill_while_writing_a_checkpoint(tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    complete = sorted(d for d in os.listdir(ckpts) if d.startswith("checkpoint-"))
    assert complete, "the previous checkpoint is there"
    latest = ckpts / complete[-1]
    load_file(latest / "model.safetensors")  # complete and readable
    python_m("train.tokenizer", *TOK, "--output-dir", str(tmp_path / "run"), "--resume-from-checkpoint", "latest")
    assert not any(d.startswith(".tmp-") for d in os.listdir(ckpts)), "the half-written one was cleaned up"
    python_m("train.tokenizer", *TOK, "--output-dir", str(tmp_path / "ref"))
    resumed, ref = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    for k in ref:
        assert torch.allclose(ref[k], resumed[k], atol=1e-6), k
    VQVAE.from_pretrained(tmp_path / "run")
