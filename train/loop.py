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
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, send_to_device
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.cli import UsageError, UserError, option
from common.hub import push_folder, write_model_card
from common.files import publish_dir, staging_dir, staging_path


class TrainingError(UserError):
    """A run that cannot go on (NaN loss, bad checkpoint); the message is one line."""


SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]  # transformers' get_scheduler names


@dataclass
class TrainingArguments:
    output_dir: str = option("runs/out", "Run folder: checkpoints, images, logs, final model.")
    seed: int = option(0, "Seeds data order, initialisation and every step's randomness.", domain="non-negative")
    train_batch_size: int = option(64, "Batch size per process.", domain="positive")
    eval_batch_size: int = option(256, "Evaluation batch size per process.", domain="positive")
    max_train_steps: int = option(1000, "Optimizer steps in total.", domain="positive")
    learning_rate: float = option(2e-4, "Peak learning rate of AdamW.", domain="positive")
    weight_decay: float = option(0.0, "AdamW weight decay of the matrices (biases and norms never decay).", domain="non-negative")  # fmt: skip
    adam_beta1: float = option(0.9, domain="probability")
    adam_beta2: float = option(0.99, domain="probability")
    lr_scheduler: str = option("constant_with_warmup", "A transformers scheduler name.", choices=SCHEDULERS)
    lr_warmup_steps: int = option(100, domain="non-negative")
    max_grad_norm: float = option(1.0, "Gradient clipping; 0 disables.", domain="non-negative")
    gradient_accumulation_steps: int = option(1, domain="positive")
    mixed_precision: str = option("no", "Autocast dtype; the codebook and its distances stay float32. auto: bf16 where the hardware makes this stage faster with it (a GPU with bf16; a CPU with AMX, for the tokenizer), else no; recorded in the model card.", choices=["no", "fp16", "bf16", "auto"])  # fmt: skip
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every N steps.", domain="positive")
    checkpoints_total_limit: int | None = option(3, "Keep at most N checkpoints.", domain="positive")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder.")
    eval_steps: int = option(500, "Evaluate and write an image grid every N steps.", domain="positive")
    logging_steps: int = option(50, domain="positive")
    report_to: str = option("none", "none | wandb | tensorboard | all, or a comma list.")
    tracker_project: str = option("vqgpt", "wandb project / tensorboard run name.")
    push_to_hub: bool = False
    hub_model_id: str | None = option(None, "Hub repo id for --push-to-hub.")
    hub_private: bool = False
    # GPU speed. Each is measured against its absence in bench/gpu.py.
    tf32: bool = option(True, "TF32 matmuls on Ampere and newer GPUs (the quantizer's distances stay full float32).")  # fmt: skip
    fused_adamw: bool | None = option(None, "AdamW's fused kernel; unset: on when training on a GPU.")
    torch_compile: bool = option(False, "torch.compile the model (accelerate's inductor backend; on a CPU it slows the tokenizer, docs/scaling.md); also `accelerate launch --dynamo_backend inductor`.")  # fmt: skip

    def validate(self) -> None:
        trackers = {"none", "all", "wandb", "tensorboard"}
        if not set(self.report_to.split(",")) <= trackers:
            raise UsageError(f"--report-to {self.report_to!r}: expected none, wandb, tensorboard, all, or a comma list of them")  # fmt: skip
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push-to-hub needs --hub-model-id (e.g. user/vqgpt-fashion-mnist)")
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            raise TrainingError(f"checkpoint {self.resume_from_checkpoint} does not exist; expected a checkpoint folder or 'latest'")  # fmt: skip


class Stage(Protocol):
    """What a training stage supplies to :func:`train`.

    A stage may also set ``auxiliary``: a second network trained beside the model by its own AdamW
    (learning rate ``auxiliary_lr``) on the part of the stage's loss that reaches it (the tokenizer's
    discriminator). The loop prepares it, checkpoints and resumes it with the model, accumulates and
    clips its gradients alike, and replaces ``stage.auxiliary`` with the prepared module.
    """

    name: str  # "tokenizer" | "prior" | "classifier"

    def training_loss(self, model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:  # fmt: skip
        """Loss and logged scalars for one batch at optimizer step ``step``; ``model`` may be DDP-wrapped.
        The logged keys are the same at every step."""

    def evaluate(self, model: torch.nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
        """Metrics over the whole evaluation set (every rank calls it; ``model`` is unwrapped)."""

    def image(self, model: torch.nn.Module, accelerator: Accelerator) -> Image.Image | None:
        """A grid to look at (reconstructions, samples); called on every rank."""

    def model_card(self, model: torch.nn.Module) -> dict[str, Any]:
        """The arguments of :func:`common.hub.write_model_card` for the final model, less its folder."""


# ---------------------------------------------------------------- setup


# Stages whose training step bf16 autocast makes faster on a CPU with AMX (docs/results.md#precision).
BF16_CPU_STAGES = ("tokenizer",)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def resolve_precision(choice: str, stage: str, gpu_bf16: bool | None = None, flags: set[str] | None = None) -> tuple[str, str]:
    """``--mixed-precision`` as the loop runs it, and why: ``auto`` is bf16 on a GPU that has it and, on a
    CPU, only where it has AMX (its bf16 matrix unit) and only for the stages measured faster there.
    ``gpu_bf16`` (None: no GPU) and ``flags`` (the CPU's) default to this machine's."""
    if choice != "auto":
        return choice, "asked for"
    if gpu_bf16 is None and flags is None and torch.cuda.is_available():
        gpu_bf16 = torch.cuda.is_bf16_supported()
    if gpu_bf16 is not None:
        return ("bf16", "auto: a GPU with bf16") if gpu_bf16 else ("no", "auto: a GPU without bf16")
    if "amx_bf16" not in (cpu_flags() if flags is None else flags):
        return "no", "auto: no bf16 matrix unit (AMX) on this CPU"
    if stage in BF16_CPU_STAGES:
        return "bf16", f"auto: AMX on this CPU, measured faster for the {stage}"
    return "no", f"auto: AMX on this CPU, but bf16 measured slower for the {stage}"


def make_accelerator(args: TrainingArguments, stage: str = "") -> Accelerator:
    """The run's Accelerator; ``stage`` (tokenizer, prior, classifier) settles ``--mixed-precision auto``."""
    args.mixed_precision, args.precision_note = resolve_precision(args.mixed_precision, stage)
    trackers = {"none": None, "all": "all"}.get(args.report_to, args.report_to.split(","))
    # TF32 for every float32 matmul unless a region asks for full precision (the quantizer's distances do).
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
        # Epoch shuffles from (seed, epoch) alone, so a resumed run sees the batches it would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # --torch-compile, or whatever `accelerate launch --dynamo_backend` chose (None reads it).
        dynamo_backend="inductor" if args.torch_compile else None,
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.print(f"mixed precision: {args.mixed_precision} ({args.precision_note})")
    return accelerator


def make_optimizer(model: torch.nn.Module, args: TrainingArguments, device: torch.device, lr: float | None = None) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with weight decay on matrices only (nanoGPT's rule: biases and norm scales never decay).

    The fused kernel (one launch for all parameters) is the default on a GPU; the CPU keeps foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    fused = args.fused_adamw if args.fused_adamw is not None else device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), fused=fused or None)  # fmt: skip


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


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, state: dict, stream=None) -> str:
    """``save_state`` into a temporary folder, then rename it: a crash never leaves a half checkpoint.

    ``stream``: the training stream whose position every rank saves beside the weights.
    """
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
    if stream is not None:
        torch.save(stream.state_dict(), os.path.join(tmp, f"stream_state_{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "num_processes": accelerator.num_processes}, f)
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


def load_checkpoint(accelerator: Accelerator, path: str, stream=None) -> dict:
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        accelerator.load_state(path)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} is missing files or corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip
    if stream is not None:
        saved = state.get("num_processes", 1)
        if saved != accelerator.num_processes:
            raise TrainingError(f"checkpoint {path} was written by {saved} process(es); a stream resumes exactly only with the same number, not {accelerator.num_processes}")  # fmt: skip
        stream.load_state_dict(torch.load(os.path.join(path, f"stream_state_{accelerator.process_index}.pt"), weights_only=False))  # fmt: skip
    return state


# ---------------------------------------------------------------- final model


def save_final(accelerator: Accelerator, args: TrainingArguments, stage: Stage, model, metrics: dict) -> None:
    """Save the final model into ``output_dir`` through a temporary folder and per-file renames.

    Every rank takes part in gathering the weights (under FSDP each holds only a shard); the main
    process writes them.
    """
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    # The run folder also holds checkpoints and images, so the model files are renamed in one by one.
    tmp = staging_dir(os.path.join(args.output_dir, "model"))
    unwrapped.save_pretrained(tmp, state_dict=state_dict)
    card = stage.model_card(unwrapped)
    card["details"] = {**card["details"], "mixed precision": f"{args.mixed_precision} ({getattr(args, 'precision_note', 'asked for')})"}
    write_model_card(tmp, metrics=metrics, **card)
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
    """Train ``model`` for ``args.max_train_steps`` optimizer steps; returns the final metrics.

    ``train_loader`` is a map-style DataLoader (accelerate shards and shuffles it per epoch) or a
    stream (its dataset has ``state_dict``: it is already split per process, endless, and its position
    is saved with every checkpoint).
    """
    stream = train_loader.dataset if hasattr(train_loader.dataset, "state_dict") else None
    optimizers = [make_optimizer(model, args, accelerator.device)]
    if getattr(stage, "auxiliary", None) is not None:
        optimizers.append(make_optimizer(stage.auxiliary, args, accelerator.device, getattr(stage, "auxiliary_lr", None)))
    # Stepped once per optimizer step by us (not prepared: accelerate would step them once per process).
    schedulers = [get_scheduler(args.lr_scheduler, opt, num_warmup_steps=args.lr_warmup_steps,
                                num_training_steps=args.max_train_steps) for opt in optimizers]  # fmt: skip
    if stream is None:
        model, optimizers[0], train_loader, eval_loader = accelerator.prepare(model, optimizers[0], train_loader, eval_loader)
        if len(train_loader) == 0:
            raise TrainingError(f"no full training batch: {len(train_loader.dataset)} images, batch size {args.train_batch_size}")  # fmt: skip
    else:
        model, optimizers[0], eval_loader = accelerator.prepare(model, optimizers[0], eval_loader)
    models = [model]
    if len(optimizers) > 1:
        stage.auxiliary, optimizers[1] = accelerator.prepare(stage.auxiliary, optimizers[1])
        models.append(stage.auxiliary)
    for scheduler in schedulers:
        accelerator.register_for_checkpointing(scheduler)
    # Evaluation calls the model outside the training step. Under FSDP only the prepared module can run
    # it (its parameters are shards); elsewhere the plain module skips DDP's wrapper.
    eval_model = model if accelerator.distributed_type == DistributedType.FSDP else accelerator.unwrap_model(model)

    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = resolve_checkpoint(args)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, stream)
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
            metrics = stage.evaluate(eval_model, eval_loader, accelerator)
            grid = stage.image(eval_model, accelerator)
        model.train()
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if grid is not None and accelerator.is_main_process:
            os.makedirs(images_dir, exist_ok=True)
            grid.save(os.path.join(images_dir, f"{stage.name}-{step:07d}.png"))
            log_image(accelerator, f"eval/{stage.name}", grid, step)
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def batches():
        """(epoch, batch) pairs from where the run stands; map-style loaders resume mid-epoch by skipping."""
        nonlocal epoch, batch_in_epoch
        if stream is not None:  # endless; its own state already holds the position
            for batch in train_loader:
                yield send_to_device(batch, accelerator.device, non_blocking=True)
        while True:
            train_loader.set_epoch(epoch)
            loader = skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
            yield from loader
            epoch, batch_in_epoch = epoch + 1, 0

    progress = tqdm(total=args.max_train_steps, initial=step, desc=f"train {stage.name}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)  # fmt: skip
    metrics: dict[str, float] = {}
    try:
        model.train()
        running: torch.Tensor | None = None  # sums of (loss, *logs) since the last log
        n_running, t_last, micro = 0, time.time(), 0
        for batch in batches() if step < args.max_train_steps else ():
            batch_in_epoch += 1
            seed_step(args.seed, step, micro, accelerator.process_index)
            with accelerator.accumulate(*models):
                # One backward: the stage keeps each network's loss from reaching the other's weights.
                loss, logs = stage.training_loss(model, batch, step)
                _check_finite(accelerator, loss, step)
                accelerator.backward(loss)
                for net, opt in zip(models, optimizers):
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(net.parameters(), args.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
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
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                reduced = accelerator.reduce(running / n_running, "mean")
                logged = {f"train/{k}": float(v) for k, v in zip(["loss", *logs], reduced)}
                logged["train/lr"] = schedulers[0].get_last_lr()[0]
                logged["train/steps_per_s"] = args.logging_steps / max(time.time() - t_last, 1e-9)
                accelerator.log(logged, step=step)
                progress.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in logged.items() if k != "train/lr"})
                running, n_running, t_last = None, 0, time.time()
            if step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}, stream)
            if step % args.eval_steps == 0 or step == args.max_train_steps:
                metrics = evaluate_and_show()
            if step >= args.max_train_steps:
                break
    finally:
        progress.close()  # before any error message, so that message is the last line
    if not metrics:  # resumed at the very end: nothing was evaluated in this process yet
        metrics = evaluate_and_show()
    save_final(accelerator, args, stage, model, metrics)
    accelerator.print(f"{stage.name} saved to {args.output_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    accelerator.wait_for_everyone()
    if args.push_to_hub and accelerator.is_main_process:
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
