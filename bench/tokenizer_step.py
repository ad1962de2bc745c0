"""The quantizer's share of one tokenizer training step (Fashion-MNIST preset, batch 128, real images).

Forward hooks time the quantizer (assignment, EMA update, dead-code check) inside full training steps
(forward, backward, AdamW). Target: under 15%.

    python -m bench.tokenizer_step
"""

import time

import torch

from bench.common import machine, report
from tokenizer import VQVAE, get_config
from common.data import DataArguments, ImageTransform, image_loader, load_image_data

STEPS, WARMUP = 30, 5


def main():
    print(f"machine: {machine()}")
    data = load_image_data(DataArguments(max_train_samples=128 * (STEPS + WARMUP)))
    torch.manual_seed(0)
    model = VQVAE(get_config("fashion-mnist")).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    q_time = [0.0]
    start = {}
    model.quantizer.register_forward_pre_hook(lambda m, a: start.__setitem__("t", time.perf_counter()))
    model.quantizer.register_forward_hook(lambda m, a, o: q_time.__setitem__(0, q_time[0] + time.perf_counter() - start["t"]))  # fmt: skip
    step_total, q_total = 0.0, 0.0
    for i, batch in enumerate(image_loader(data.train, ImageTransform(1), 128, shuffle=False)):
        q_time[0] = 0.0
        t = time.perf_counter()
        model(batch["pixel_values"]).loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= WARMUP:
            step_total += time.perf_counter() - t
            q_total += q_time[0]
    share = q_total / step_total
    n = STEPS
    print(f"step {step_total / n * 1e3:.0f} ms, quantizer {q_total / n * 1e3:.1f} ms: {share:.1%} of the step")
    report("quantizer share of a tokenizer step (fashion-mnist, batch 128)", share * 100, "%",
           "whole training step", step_total / n * 1e3, ratio=share, target="< 15%", ok=share < 0.15, baseline_unit="ms")  # fmt: skip


if __name__ == "__main__":
    main()
