"""Shared fixtures: offline settings, real Fashion-MNIST images, and launching the real entry points."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs -n auto), the cores are shared out between the workers so that
# their commands do not oversubscribe them; set before torch is imported here or in any subprocess.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], check: bool = True, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run a command from the repo root with the test environment; on failure show its output."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def python_m(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], **kw)


def accelerate_launch(target: str, *args: str, num_processes: int = 1, **kw) -> subprocess.CompletedProcess:
    """``accelerate launch -m module`` (or a script path); two processes are two gloo CPU ranks."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", str(num_processes), "--main_process_port", str(_free_port())]  # fmt: skip
    if num_processes > 1:
        launch.append("--multi_gpu")
    target_args = [target] if target.endswith(".py") else ["-m", target]
    return run([*launch, *target_args, *args], ACCELERATE_USE_CPU=1, **kw)


def resumed_and_uninterrupted(module: str, args: list[str], tmp_path, steps: int, stop: int) -> tuple[dict, dict]:
    """Train ``steps`` steps straight, and ``stop`` steps then resumed from the latest checkpoint to ``steps``:
    the two final state dicts (full, split), for the caller's comparison."""
    from safetensors.torch import load_file

    python_m(module, *args, "--max-train-steps", str(steps), "--output-dir", str(tmp_path / "full"))
    python_m(module, *args, "--max-train-steps", str(stop), "--output-dir", str(tmp_path / "split"))
    python_m(module, *args, "--max-train-steps", str(steps), "--output-dir", str(tmp_path / "split"),
             "--resume-from-checkpoint", "latest")  # fmt: skip
    return load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def fashion():
    """The builtin Fashion-MNIST splits (Debian's IDX files; `make test` installs them)."""
    from common.data import DataArguments, load_image_data

    return load_image_data(DataArguments(dataset="fashion_mnist"))


@pytest.fixture(scope="session")
def fashion_batch(fashion):
    """64 real Fashion-MNIST test images as (64, 1, 28, 28) in [-1, 1], and their labels."""
    from common.data import ImageTransform, image_loader

    batch = next(iter(image_loader(fashion.test.select(range(64)), ImageTransform(channels=1), 64, shuffle=False)))
    return batch["pixel_values"], batch["labels"]


# ---------------------------------------------------------------- the tiny two-stage chain, built once

TOK_ARGS = ["--preset", "tiny", "--max-train-samples", "4096", "--max-eval-samples", "512", "--train-batch-size", "64",
            "--max-train-steps", "150", "--learning-rate", "2e-3", "--lr-warmup-steps", "10", "--eval-steps", "150",
            "--checkpointing-steps", "1000"]  # fmt: skip
PRIOR_ARGS = ["--preset", "tiny", "--train-batch-size", "64", "--max-train-steps", "150", "--learning-rate", "3e-3",
              "--lr-warmup-steps", "10", "--eval-steps", "150", "--checkpointing-steps", "1000",
              "--samples-per-class", "2"]  # fmt: skip


CLASSIFIER_ARGS = ["--width", "8", "--max-train-samples", "4096", "--max-eval-samples", "500", "--train-batch-size", "64",
                   "--max-train-steps", "120", "--learning-rate", "3e-3", "--lr-warmup-steps", "10", "--eval-steps", "120",
                   "--checkpointing-steps", "60"]  # fmt: skip


def _build_chain(root) -> None:
    tok, codes, prior, clf = root / "tok", root / "codes", root / "prior", root / "classifier"
    accelerate_launch("train.tokenizer", *TOK_ARGS, "--output-dir", str(tok))
    python_m("train.encode", "--tokenizer", str(tok), "--max-train-samples", "4096", "--max-eval-samples", "512",
             "--batch-size", "500", "--output-dir", str(codes))  # fmt: skip
    accelerate_launch("train.prior", "--codes", str(codes), *PRIOR_ARGS, "--output-dir", str(prior))
    accelerate_launch("train.classifier", *CLASSIFIER_ARGS, "--output-dir", str(clf))


@pytest.fixture(scope="session")
def chain(tmp_path_factory, worker_id):
    """A tiny tokenizer, its codes, a tiny prior and a reference classifier, made by the real command
    lines on Fashion-MNIST; once per run, shared by pytest-xdist's workers (the first to ask builds it
    under a file lock, as xdist's documentation shows). Tests read it and never write into it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = shared / "chain"
    with FileLock(str(shared / "chain.lock")):
        if not (root / "built").exists():
            root.mkdir(exist_ok=True)
            _build_chain(root)
            (root / "built").touch()
    return {"root": root, "tokenizer": root / "tok", "codes": root / "codes", "prior": root / "prior",
            "classifier": root / "classifier"}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """Under `-n auto --dist loadfile`: the end-to-end module (the longest, without the chain) first, then the
    modules that use the chain, then the rest; so one worker runs the demo while another builds the chain,
    and short modules fill the end instead of a long one running alone."""
    with_chain = {item.path.name for item in items if "chain" in item.fixturenames}
    items.sort(key=lambda item: 0 if item.path.name == "test_end_to_end.py" else 1 if item.path.name in with_chain else 2)
