"""GPU figures, side by side in one run: throughput and peak memory of both stages and the sampler under
bf16, and the measured effect of each fast path (TF32, fused AdamW, channels_last, DataLoader workers with
pinned memory, torch.compile, the static KV cache). Also checks on the GPU that the codebook and its
distances stay float32, and that a short run ends with the same weights on the CPU and on the GPU.

    python -m bench.gpu            # needs CUDA; make bench runs it only where CUDA is present
    python -m bench.gpu --smoke    # every section at toy sizes on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import machine, report
from common.data import DataArguments, ImageTransform, image_loader, load_image_data
from common.images import psnr
from prior import PriorInfo, build_prior, generate_codes, prior_loss
from tokenizer import VQVAE, get_config
from tokenizer.quantizer import full_float32_matmul
from train.loop import TrainingArguments, make_optimizer

SMOKE = False


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, n: int, warmup: int) -> float:
    """Median seconds per call of ``step`` over ``n`` calls after ``warmup``."""
    for _ in range(1 if SMOKE else warmup):
        step()
    sync()
    times = []
    for _ in range(1 if SMOKE else n):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_mib(device) -> int | None:
    return round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def optimizer_for(model, device, fused=None, lr=1e-4):
    return make_optimizer(model, TrainingArguments(learning_rate=lr, fused_adamw=fused), device)


# ---------------------------------------------------------------- stage one


def tokenizer_step_time(device, preset: str, size: int, batch: int, dtype, channels_last=False, compile=False,
                        fused=None) -> tuple[float, float]:  # fmt: skip
    """(seconds per training step, peak MiB) of the tokenizer on random images."""
    torch.manual_seed(0)
    cfg = get_config(preset, **({"channels": 8, "num_codes": 64} if SMOKE else {}))
    model = VQVAE(cfg).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = optimizer_for(model, device, fused)
    x = (torch.rand(batch, cfg.in_channels, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    fwd = torch.compile(model) if compile else model
    reset_peak(device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, 20, 5 if not compile else 10), peak_mib(device)


def bench_tokenizer(device):
    size, batch = (28, 512) if not SMOKE else (28, 8)
    base, base_mem = tokenizer_step_time(device, "fashion-mnist", size, batch, torch.bfloat16)
    report("tokenizer training, fashion-mnist preset, bf16", batch / base, "img/s", target="(reported)",
           peak_mib=base_mem, batch=batch)  # fmt: skip
    rgb_size, rgb_batch = (64, 128) if not SMOKE else (32, 4)
    rgb, rgb_mem = tokenizer_step_time(device, "rgb-32", rgb_size, rgb_batch, torch.bfloat16)
    report(f"tokenizer training, rgb-32 preset at {rgb_size} px, bf16", rgb_batch / rgb, "img/s", target="(reported)",
           peak_mib=rgb_mem, batch=rgb_batch)  # fmt: skip
    torch.set_float32_matmul_precision("highest")
    fp32, _ = tokenizer_step_time(device, "rgb-32", rgb_size, rgb_batch, torch.float32)
    torch.set_float32_matmul_precision("high")
    tf32, _ = tokenizer_step_time(device, "rgb-32", rgb_size, rgb_batch, torch.float32)
    report("tokenizer fp32 step (rgb-32): TF32 matmuls vs IEEE", tf32 * 1e3, "ms", "IEEE float32", fp32 * 1e3, ratio=fp32 / tf32,
           target="(measured; default on)")  # fmt: skip
    report("tokenizer step (rgb-32, bf16): bf16 autocast vs fp32 (TF32)", rgb * 1e3, "ms", "fp32 with TF32", tf32 * 1e3,
           ratio=tf32 / rgb, target="(measured)")  # fmt: skip
    cl, _ = tokenizer_step_time(device, "rgb-32", rgb_size, rgb_batch, torch.bfloat16, channels_last=True)
    report("tokenizer step (rgb-32, bf16): channels_last vs NCHW", cl * 1e3, "ms", "NCHW", rgb * 1e3, ratio=rgb / cl,
           target="(measured; --channels-last)")  # fmt: skip
    comp, _ = tokenizer_step_time(device, "rgb-32", rgb_size, rgb_batch, torch.bfloat16, compile=True)
    report("tokenizer step (rgb-32, bf16): torch.compile vs eager", comp * 1e3, "ms", "eager", rgb * 1e3, ratio=rgb / comp,
           target="(measured; --torch-compile)")  # fmt: skip


def bench_loader(device):
    """Decoding real PNGs: a tokenizer step fed by 0 workers vs 4 workers with pinned memory."""
    data = load_image_data(DataArguments(max_train_samples=512 * 30 if not SMOKE else 64))
    batch = 512 if not SMOKE else 8
    torch.manual_seed(0)
    model = VQVAE(get_config("fashion-mnist")).to(device).train()
    opt = optimizer_for(model, device)
    rates = {}
    for workers in (0, 4):
        loader = image_loader(data.train, ImageTransform(1), batch, shuffle=True, num_workers=workers, drop_last=True)
        n, t = 0, None
        for i, b in enumerate(loader):
            if i == 2:
                sync()
                t, n = time.perf_counter(), 0
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(b["pixel_values"].to(device, non_blocking=True)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += len(b["pixel_values"])
        sync()
        rates[workers] = n / max(time.perf_counter() - t, 1e-9) if t else float("nan")
    report("tokenizer training from PNGs: 4 workers + pinned memory vs 0 workers", rates[4], "img/s", "0 workers", rates[0],
           ratio=rates[4] / rates[0], target="(measured; --num-workers)")  # fmt: skip


def check_float32_codebook(device):
    """bf16 autocast training keeps the codebook float32; the distances stay IEEE float32 under TF32."""
    torch.manual_seed(0)
    model = VQVAE(get_config("fashion-mnist")).to(device).train()
    opt = optimizer_for(model, device)
    x = torch.rand(64, 1, 28, 28, device=device) * 2 - 1
    for _ in range(5):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    q = model.quantizer
    ok_dtype = q.codebook.dtype == q.ema_sum.dtype == q.ema_count.dtype == torch.float32
    # Vectors between pairs of codes: their nearest code is a near tie, which TF32 (10-bit mantissa) flips.
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = torch.randint(0, q.num_codes, (2, 65536), generator=g)
    e = q.codebook.detach().double().cpu()
    z = 0.5 * (e[a] + e[b]) + 1e-4 * torch.randn(65536, q.dim, generator=g, dtype=torch.float64)
    exact = torch.cdist(z, e).argmin(1)
    torch.set_float32_matmul_precision("high")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        guarded = q.nearest(z.float().to(device)).cpu()
    ec = q.codebook.float()
    raw = torch.cat([(-2 * z.float().to(device)[i : i + 4096] @ ec.T + (ec * ec).sum(1)).argmin(1) for i in range(0, 65536, 4096)]).cpu()  # fmt: skip
    with full_float32_matmul():
        ieee = torch.cat([(-2 * z.float().to(device)[i : i + 4096] @ ec.T + (ec * ec).sum(1)).argmin(1) for i in range(0, 65536, 4096)]).cpu()  # fmt: skip
    wrong_guarded = float((guarded != exact).float().mean())
    wrong_raw = float((raw != exact).float().mean())
    wrong_ieee = float((ieee != exact).float().mean())
    print(f"codebook dtypes float32: {ok_dtype}; near-tie assignments off the float64 answer: "
          f"quantizer {wrong_guarded:.4%}, same matmul under TF32 {wrong_raw:.4%}, IEEE float32 {wrong_ieee:.4%}")  # fmt: skip
    report("near-tie code assignments off float64, quantizer under bf16 + TF32", wrong_guarded * 100, "%",
           "the same matmul left to TF32", wrong_raw * 100, target="= IEEE float32's", ok=ok_dtype and wrong_guarded <= wrong_ieee,
           ieee_float32=round(wrong_ieee * 100, 4))  # fmt: skip


def cpu_vs_gpu(device):
    """The same 20 fp32 steps (IEEE matmuls) on the CPU and on the GPU: weights and PSNR side by side.

    Few steps on purpose: rounding differs between the two devices, and training (a near-tied code
    assignment, a restart) amplifies any difference over a long run.
    """
    torch.set_float32_matmul_precision("highest")
    steps = 20 if not SMOKE else 2
    data = load_image_data(DataArguments(max_train_samples=128 * steps, max_eval_samples=1000 if not SMOKE else 16))
    batches = [b["pixel_values"] for b in image_loader(data.train, ImageTransform(1), 128, shuffle=False)]
    test = next(iter(image_loader(data.test, ImageTransform(1), 1000, shuffle=False)))["pixel_values"]
    torch.manual_seed(0)
    init = VQVAE(get_config("fashion-mnist"))
    results = {}
    for dev in ("cpu", device.type):
        model = copy.deepcopy(init).to(dev).train()
        opt = optimizer_for(model, torch.device(dev), fused=False, lr=1e-3)
        for x in batches:
            model(x.to(dev)).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            p = float(psnr(model(test.to(dev)).reconstruction, test.to(dev)).mean())
        results[dev] = ({k: v.detach().double().cpu() for k, v in model.state_dict().items()}, p)
    (w_cpu, p_cpu), (w_gpu, p_gpu) = results["cpu"], results[device.type]
    rel = {k: float((w_cpu[k] - w_gpu[k]).norm() / w_cpu[k].norm().clamp(min=1e-12)) for k in w_cpu if w_cpu[k].is_floating_point()}
    weights = max(v for k, v in rel.items() if not k.startswith("quantizer."))
    codebook = rel["quantizer.codebook"]
    print(f"CPU vs {device.type} after {steps} steps: PSNR {p_cpu:.3f} vs {p_gpu:.3f} dB; largest relative difference "
          f"of a weight tensor {weights:.2e}, of the codebook {codebook:.2e}")  # fmt: skip
    report(f"CPU vs GPU after {steps} fp32 steps: largest relative weight difference", weights, "", target="< 1e-3",
           ok=weights < 1e-3, codebook=f"{codebook:.1e}", psnr_cpu=round(p_cpu, 3), psnr_gpu=round(p_gpu, 3))  # fmt: skip
    torch.set_float32_matmul_precision("high")


# ---------------------------------------------------------------- stage two


def prior_step_time(device, preset: str, grid: tuple[int, int], k: int, batch: int, dtype, arch="gpt2", fused=None,
                    compile=False) -> tuple[float, float]:  # fmt: skip
    info = PriorInfo(k, 10, [str(i) for i in range(10)], grid, None, None)
    torch.manual_seed(0)
    model = build_prior(preset if not SMOKE else "tiny", info, arch=arch).to(device).train()
    opt = optimizer_for(model, device, fused)
    codes = torch.randint(0, k, (batch, info.seq_len), device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    fwd = torch.compile(model) if compile else model
    reset_peak(device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = prior_loss(fwd, codes, labels, info.layout, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, 20, 5 if not compile else 10), peak_mib(device)


def bench_prior(device):
    batch = 256 if not SMOKE else 4
    for preset, grid, k in (("fashion-mnist", (7, 7), 512), ("small", (16, 16), 1024)):
        for arch in ("gpt2", "llama"):
            t, mem = prior_step_time(device, preset, grid, k, batch, torch.bfloat16, arch=arch)
            report(f"prior training, {preset} preset ({arch}), {grid[0]}x{grid[1]} codes, bf16", batch * grid[0] * grid[1] / t,
                   "tokens/s", target="(reported)", peak_mib=mem, batch=batch)  # fmt: skip
    grid, k = (16, 16), 1024
    bf16, _ = prior_step_time(device, "small", grid, k, batch, torch.bfloat16)
    foreach, _ = prior_step_time(device, "small", grid, k, batch, torch.bfloat16, fused=False)
    report("prior step (small, bf16): fused AdamW vs foreach", bf16 * 1e3, "ms", "foreach AdamW", foreach * 1e3,
           ratio=foreach / bf16, target="(measured; default on GPUs)")  # fmt: skip
    torch.set_float32_matmul_precision("highest")
    ieee, _ = prior_step_time(device, "small", grid, k, batch, torch.float32)
    torch.set_float32_matmul_precision("high")
    tf32, _ = prior_step_time(device, "small", grid, k, batch, torch.float32)
    report("prior fp32 step (small): TF32 matmuls vs IEEE", tf32 * 1e3, "ms", "IEEE float32", ieee * 1e3, ratio=ieee / tf32,
           target="(measured; default on)")  # fmt: skip
    comp, _ = prior_step_time(device, "small", grid, k, batch, torch.bfloat16, compile=True)
    report("prior step (small, bf16): torch.compile vs eager", comp * 1e3, "ms", "eager", bf16 * 1e3, ratio=bf16 / comp,
           target="(measured; --torch-compile)")  # fmt: skip


def bench_sampling(device):
    n = 1000 if not SMOKE else 4
    for preset, grid, k in (("fashion-mnist", (7, 7), 512), ("small", (16, 16), 1024)):
        info = PriorInfo(k, 10, [str(i) for i in range(10)], grid, None, None)
        torch.manual_seed(0)
        model = build_prior(preset if not SMOKE else "tiny", info).to(device).eval()
        labels = torch.arange(n) % 10
        g = torch.Generator(device=device)

        def run(scale, **kw):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return timed(lambda: generate_codes(model, info.layout, info.seq_len, labels, guidance_scale=scale,
                                                    generator=g.manual_seed(0), **kw), 3, 1)  # fmt: skip

        plain, guided = run(1.0), run(2.0)
        report(f"sampling {n} images, {preset} prior, {grid[0]}x{grid[1]} codes, bf16", n / plain, "img/s",
               "with guidance (scale 2)", n / guided, baseline_unit="img/s", ratio=guided / plain, target="(reported)")  # fmt: skip
        static = run(2.0, cache="static")
        report(f"sampling ({preset}, guided): static KV cache vs dynamic", n / static, "img/s", "dynamic cache", n / guided,
               ratio=guided / static, target="(measured)")  # fmt: skip
        if device.type == "cuda":
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=False)
            graph = run(2.0, cache="static", forward=compiled)
            report(f"sampling ({preset}, guided): static cache + CUDA graphs (torch.compile) vs dynamic", n / graph, "img/s",
                   "dynamic cache", n / guided, ratio=guided / graph, target="(measured)")  # fmt: skip


def main():
    global SMOKE
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the script only")
    p.add_argument("--only", default=None, help="comma list of sections: tokenizer,loader,codebook,cpu,prior,sampling")
    args = p.parse_args()
    SMOKE = args.smoke
    if not torch.cuda.is_available() and not SMOKE:
        print("no CUDA device: the GPU benchmarks are skipped")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}")
    sections = {"tokenizer": bench_tokenizer, "loader": bench_loader, "codebook": check_float32_codebook,
                "cpu": cpu_vs_gpu, "prior": bench_prior, "sampling": bench_sampling}  # fmt: skip
    for name in (args.only.split(",") if args.only else sections):
        t = time.perf_counter()
        sections[name](device)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
