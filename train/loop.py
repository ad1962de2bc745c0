"""The one training loop of vqgpt, shared by both stages.

A stage (``train/tokenizer.py``, ``train/prior.py``) says only what differs: the model, batch -> loss,
evaluation, the image it shows, and how the final model is saved. Everything else lives here: the
Accelerator, gradient accumulation, mixed precision, atomic rotating checkpoints, mid-epoch resume,
trackers, the progress bar, periodic evaluation, the final save and the Hub push.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from PIL import Image
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from tokenizer.hub import push_folder, write_model_card
from train.files import publish_dir, staging_dir, staging_path


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, bad checkpoint); the message is one line."""


@dataclass
class TrainingArguments:
    output_dir: str = field(default="runs/out", metadata={"help": "Run folder: checkpoints, images, logs, final model."})
    seed: int = field(default=0, metadata={"help": "Seeds data order, initialisation and every step's randomness."})
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per process."})
    max_train_steps: int = field(default=1000, metadata={"help": "Optimizer steps in total."})
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "A transformers scheduler name (cosine, linear, ...)."})  # fmt: skip
    lr_warmup_steps: int = 100
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables."})
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    eval_steps: int = field(default=500, metadata={"help": "Evaluate and write an image grid every N steps."})
    logging_steps: int = 50
    report_to: str = field(default="none", metadata={"help": "none | wandb | tensorboard | all"})
    tracker_project: str = field(default="vqgpt", metadata={"help": "wandb project / tensorboard run name."})
    push_to_hub: bool = False
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push-to-hub."})
    hub_private: bool = False


class Stage(Protocol):
    """What a training stage supplies to :func:`train`."""

    name: str  # "tokenizer" | "prior"

    def training_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss and logged scalars for one batch; ``model`` may be DDP-wrapped."""

    def evaluate(self, model: torch.nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """Metrics over the whole evaluation set (every rank calls it; ``model`` is unwrapped)."""

    def image(self, model: torch.nn.Module, accelerator: Accelerator) -> Image.Image | None:
        """A grid to look at (reconstructions, samples); called on every rank."""

    def model_card(self, model: torch.nn.Module) -> dict[str, Any]:
        """The arguments of :func:`tokenizer.hub.write_model_card` for the final model, less its folder."""


# ---------------------------------------------------------------- command line


def parse_args(types: tuple[type, ...], argv: list[str] | None = None, **defaults) -> tuple:
    """Dataclasses from ``argv``, or from a single ``.json``/``.yaml`` file argument.

    ``defaults`` override the dataclasses' defaults for one entry point (e.g. the prior's schedule).
    """
    parser = HfArgumentParser(types)
    parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def run_main(main) -> None:
    """Run an entry point; user errors become one line on stderr and exit status 1."""
    from train.data import DataError

    try:
        main()
    except (DataError, TrainingError, ValueError, FileNotFoundError) as e:
        if os.environ.get("VQGPT_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------- setup


def make_accelerator(args: TrainingArguments) -> Accelerator:
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision {args.mixed_precision!r}; expected no, fp16 or bf16")
    trackers = {"none": None, "all": "all"}.get(args.report_to, args.report_to.split(","))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
        # Epoch shuffles from (seed, epoch) alone, so a resumed run sees the batches it would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed torch's RNG from (seed, step, micro-batch, rank).

    Every step's randomness (dropout, label dropout) is then a function of where the run is, not of
    what happened before, so a run resumed from a checkpoint draws exactly what an uninterrupted one does.
    """
    torch.manual_seed((seed * 1_000_003 + step * 1009 + micro * 101 + rank) % (2**63))


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves are not listed."""
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := CHECKPOINT_RE.match(d))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, state: dict) -> str:
    """``save_state`` into a temporary folder, then rename it: a crash never leaves a half checkpoint."""
    root = checkpoint_dir(args.output_dir)
    final = os.path.join(root, f"checkpoint-{state['step']}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):  # leftovers of saves that were killed
            if d.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    tmp = staging_path(final)  # every rank's save_state writes its part here
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        publish_dir(tmp, final)
        if args.checkpoints_total_limit:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(args: TrainingArguments) -> str | None:
    spec = args.resume_from_checkpoint
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1] if found else None
    if not os.path.isdir(spec):
        raise TrainingError(f"checkpoint {spec} does not exist; expected a checkpoint folder or 'latest'")
    return spec


def load_checkpoint(accelerator: Accelerator, path: str) -> dict:
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        accelerator.load_state(path)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} is missing files or corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip
    return state


# ---------------------------------------------------------------- final model


def save_final(accelerator: Accelerator, args: TrainingArguments, stage: Stage, model, metrics: dict) -> None:
    """Save the final model into ``output_dir`` through a temporary folder and per-file renames."""
    if not accelerator.is_main_process:
        return
    # The run folder also holds checkpoints and images, so the model files are renamed in one by one.
    tmp = staging_dir(os.path.join(args.output_dir, "model"))
    model.save_pretrained(tmp)
    write_model_card(tmp, metrics=metrics, **stage.model_card(model))
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config last: it marks a model
        os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    os.rmdir(tmp)


def log_image(accelerator: Accelerator, key: str, image: Image.Image, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({key: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")


# ---------------------------------------------------------------- the loop


def train(accelerator: Accelerator, args: TrainingArguments, stage: Stage, model: torch.nn.Module,
          train_loader, eval_loader, tracker_config: dict[str, Any] | None = None) -> dict[str, float]:  # fmt: skip
    """Train ``model`` for ``args.max_train_steps`` optimizer steps; returns the final metrics."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay
    )
    # Stepped once per optimizer step by us (not prepared: accelerate would step it once per process).
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                              num_training_steps=args.max_train_steps)  # fmt: skip
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    accelerator.register_for_checkpointing(scheduler)
    if len(train_loader) == 0:
        raise TrainingError(f"no full training batch: {len(train_loader.dataset)} images, batch size {args.train_batch_size}")  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)

    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = resolve_checkpoint(args)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {checkpoint_dir(args.output_dir)}; starting a new run")

    if accelerator.is_main_process and args.report_to != "none":
        config = {**asdict(args), **(tracker_config or {})}
        init_kwargs = {"wandb": {"dir": args.output_dir, "name": os.path.basename(os.path.abspath(args.output_dir))}}
        accelerator.init_trackers(args.tracker_project, config=_loggable(config), init_kwargs=init_kwargs)
    images_dir = os.path.join(args.output_dir, "images")

    def evaluate_and_show() -> dict[str, float]:
        model.eval()
        with accelerator.autocast():
            metrics = stage.evaluate(unwrapped, eval_loader, accelerator)
            grid = stage.image(unwrapped, accelerator)
        model.train()
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if grid is not None and accelerator.is_main_process:
            os.makedirs(images_dir, exist_ok=True)
            grid.save(os.path.join(images_dir, f"{stage.name}-{step:07d}.png"))
            log_image(accelerator, f"eval/{stage.name}", grid, step)
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    progress = tqdm(total=args.max_train_steps, initial=step, desc=f"train {stage.name}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)  # fmt: skip
    try:
        model.train()
        metrics: dict[str, float] = {}
        running: torch.Tensor | None = None  # sums of (loss, *logs) since the last log
        n_running, t_last = 0, time.time()
        micro = 0
        while step < args.max_train_steps:
            train_loader.set_epoch(epoch)
            loader = skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
            for batch in loader:
                batch_in_epoch += 1
                seed_step(args.seed, step, micro, accelerator.process_index)
                with accelerator.accumulate(model):
                    loss, logs = stage.training_loss(model, batch)
                    _check_finite(accelerator, loss, step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                # Summed on the device; read back only when logged.
                scalars = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).detach()
                                       for v in (loss, *logs.values())])  # fmt: skip
                running = scalars if running is None else running + scalars
                n_running += 1
                if not accelerator.sync_gradients:
                    continue
                # One optimizer step is complete: counters, schedule, logs, checkpoints, evaluation.
                micro = 0
                scheduler.step()
                step += 1
                progress.update(1)
                if step % args.logging_steps == 0 or step == args.max_train_steps:
                    reduced = accelerator.reduce(running / n_running, "mean")
                    logged = {f"train/{k}": float(v) for k, v in zip(["loss", *logs], reduced)}
                    logged["train/lr"] = scheduler.get_last_lr()[0]
                    logged["train/steps_per_s"] = args.logging_steps / max(time.time() - t_last, 1e-9)
                    accelerator.log(logged, step=step)
                    progress.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in logged.items() if k != "train/lr"})
                    running, n_running, t_last = None, 0, time.time()
                if step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch})
                if step % args.eval_steps == 0 or step == args.max_train_steps:
                    metrics = evaluate_and_show()
                if step >= args.max_train_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        progress.close()  # before any error message, so that message is the last line
    if not metrics:  # resumed at the very end: nothing was evaluated in this process yet
        metrics = evaluate_and_show()
    save_final(accelerator, args, stage, unwrapped, metrics)
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
        if not args.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id (e.g. user/vqgpt-fashion-mnist)")
        url = push_folder(args.output_dir, args.hub_model_id, private=args.hub_private)
        accelerator.print(f"pushed to {url}")
    accelerator.end_training()
    return metrics


def _check_finite(accelerator: Accelerator, loss: torch.Tensor, step: int) -> None:
    """Stop every rank together on a NaN/inf loss, before it reaches the weights or a checkpoint."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "min")
    if finite.item() < 1:
        raise TrainingError(
            f"loss is not finite at step {step}; lower --learning-rate, use --mixed-precision no, or check the data"
        )


def _loggable(config: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}
