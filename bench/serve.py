"""Load test of python -m serve on 127.0.0.1: batching on and off side by side in one run.

    python -m bench.serve --prior runs/demo/prior [--clients 1,8,32,64] [--seconds 20] [--soak 300] [--litserve DIR]

Starts the real server (a process of its own, loopback only) once with batching (the defaults) and once
serving every request alone (--max-batch-size 1), and at each client count runs that many concurrent
clients, each sending generation requests of one image back to back for --seconds. Prints, per server
and client count: images/s, p50/p95/p99 latency, responses by status, and the server's peak resident
memory (VmHWM of its processes, reset before each level). With --litserve (a folder where
``pip install --target DIR litserve pyzmq`` put LitServe), the same pipeline also runs behind LitServe's
own batching (``max_batch_size``, ``batch_timeout``), a third server in the table. Then an overload row (a server whose queue holds fewer images
than there are clients: only 200s and 503s are allowed) and, with --soak, the batching server under
32 clients for that many seconds with its resident memory sampled every 10 s. Every loop is bounded in
requests and seconds, and every request goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx
import numpy as np

from bench.common import machine, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_REQUESTS = 200_000  # per level: a bound on top of the time limit


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(prior: str, *options: str, litserve: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["-m", "serve", "--prior", prior, "--no-page"] if litserve is None else ["-m", "bench.serve", "--litserve-server", "--prior", prior]
    path = ROOT if litserve is None else f"{ROOT}:{os.path.abspath(litserve)}"
    proc = subprocess.Popen([sys.executable, *command, "--port", str(port), *options], cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def tree(pid: int) -> list[int]:
    import psutil

    root = psutil.Process(pid)
    return [root.pid, *(c.pid for c in root.children(recursive=True))]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server and every process it started (LitServe's API and inference workers), then wait."""
    import psutil

    procs = [psutil.Process(p) for p in tree(proc.pid)]
    for p in procs:
        p.terminate()
    psutil.wait_procs(procs, timeout=60)
    proc.wait(60)


def memory(pid: int, field: str = "VmHWM") -> float:
    """The peak (VmHWM) or current (VmRSS) resident memory of a process and its children, in MiB."""
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith(field))
    return total / 1024


def reset_peak(pid: int) -> None:
    for p in tree(pid):
        with open(f"/proc/{p}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (proc(5))


async def load(url: str, clients: int, seconds: float, classes: int = 10) -> dict:
    """``clients`` concurrent loops of one-image generation requests for ``seconds``: latencies and statuses."""
    latencies, statuses, stop = [], {}, time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def loop(i: int):
            n = 0
            while time.perf_counter() < stop and len(latencies) < MAX_REQUESTS:
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json={"prompt": str((i + n) % classes), "n": 1, "seed": i * 100_000 + n})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    await asyncio.sleep(0.05)
                n += 1

        begin = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - begin
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"images_per_s": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "statuses": statuses}  # fmt: skip


def level(proc, url, clients, seconds):
    reset_peak(proc.pid)
    out = asyncio.run(load(url, clients, seconds))
    out["peak_mib"] = memory(proc.pid)
    return out


try:  # only with --litserve: LitServe's process pickles the API, so its class lives at module level
    import litserve as ls
except ImportError:
    ls = None

if ls is not None:

    class LitGeneration(ls.LitAPI):
        """The same pipeline and response behind LitServe: decode_request -> batch -> predict -> unbatch -> encode_response."""

        def __init__(self, prior: str, **kw):
            super().__init__(**kw)
            self.prior = prior

        def setup(self, device):
            from sample import ClassConditionalPipeline

            self.pipe = ClassConditionalPipeline.from_pretrained(self.prior)

        def decode_request(self, request):
            import torch

            return int(request["prompt"]), torch.Generator().manual_seed(int(request["seed"]))

        def predict(self, rows):
            return list(self.pipe([label for label, _ in rows], generator=[g for _, g in rows], batch_size=len(rows)))

        def encode_response(self, image):
            from serve.service import png_b64

            return {"created": int(time.time()), "data": [{"b64_json": png_b64(image)}]}


def litserve_server(prior: str, port: int, max_batch_size: int = 64, batch_timeout: float = 0.005) -> None:
    api = LitGeneration(prior, max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/images/generations")
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--prior", default="runs/demo/prior", help="The prior folder to serve (default: make demo's).")
    p.add_argument("--clients", default="1,8,32,64", help="Comma list of concurrent client counts (default 1,8,32,64).")
    p.add_argument("--seconds", type=float, default=20, help="Seconds of load per client count (default 20).")
    p.add_argument("--soak", type=float, default=0, help="Seconds of the soak at 32 clients with batching (default 0: none).")
    p.add_argument("--litserve", default=None, help="A folder holding LitServe (pip install --target DIR litserve pyzmq): measure it too.")
    p.add_argument("--litserve-server", action="store_true", help=argparse.SUPPRESS)  # the LitServe process itself
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.litserve_server:
        return litserve_server(args.prior, args.port)
    clients = [int(c) for c in args.clients.split(",")]
    print(f"machine: {machine()}")
    results = {}
    servers = [("batching", (), None), ("one at a time", ("--max-batch-size", "1"), None)]
    if args.litserve:
        servers.append(("LitServe batching", (), args.litserve))
    for name, options, litserve in servers:
        proc, url = start(args.prior, *options, litserve=litserve)
        try:
            asyncio.run(load(url, 2, 3))  # warm-up
            for c in clients:
                results[name, c] = r = level(proc, url, c, args.seconds)
                print(f"{name:14s} {c:3d} clients: {r['images_per_s']:7.1f} img/s  p50 {r['p50'] * 1000:6.0f} ms  p95 {r['p95'] * 1000:6.0f} ms  "
                      f"p99 {r['p99'] * 1000:6.0f} ms  statuses {r['statuses']}  peak {r['peak_mib']:.0f} MiB", flush=True)  # fmt: skip
        finally:
            stop(proc)
    print("\n| server | clients | images/s | p50 (ms) | p95 (ms) | p99 (ms) | responses | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|")
    for (name, c), r in results.items():
        print(f"| {name} | {c} | {r['images_per_s']:.1f} | {r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | {r['p99'] * 1000:.0f} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items(), key=str))} | {r['peak_mib']:.0f} |")  # fmt: skip
    if 32 in clients:
        speedup = results["batching", 32]["images_per_s"] / results["one at a time", 32]["images_per_s"]
        report("serve: images/s at 32 clients, batching", results["batching", 32]["images_per_s"], "img/s",
               "one request at a time", results["one at a time", 32]["images_per_s"], speedup, "8x", speedup >= 8)  # fmt: skip
        if args.litserve:
            lit = results["LitServe batching", 32]["images_per_s"]
            report("serve: images/s at 32 clients, batching", results["batching", 32]["images_per_s"], "img/s", "LitServe's batching",
                   lit, results["batching", 32]["images_per_s"] / lit)  # fmt: skip
    if 8 in clients:
        p99 = results["batching", 8]["p99"]
        report("serve: p99 latency at 8 clients, batching", p99, "s", target="< 2 s", ok=p99 < 2)

    # Past the queue: a queue of 16 images under 64 clients; only 200 and 503 may come back.
    proc, url = start(args.prior, "--max-queue", "16", "--max-batch-size", "16")
    try:
        over = level(proc, url, 64, min(args.seconds, 10))
    finally:
        stop(proc)
    others = {k: v for k, v in over["statuses"].items() if k not in (200, 503)}
    print(f"\noverload (queue 16 images, 64 clients): {over['images_per_s']:.1f} img/s, statuses {over['statuses']}")
    report("serve: responses past the queue other than 200/503", sum(others.values()), "responses", target="0", ok=not others)

    if args.soak:
        proc, url = start(args.prior)
        samples = []
        try:
            asyncio.run(load(url, 2, 3))
            begin = time.perf_counter()

            async def soak():
                task = asyncio.create_task(load(url, 32, args.soak))
                while not task.done():
                    samples.append((time.perf_counter() - begin, memory(proc.pid, "VmRSS")))
                    await asyncio.wait({task}, timeout=10)
                return task.result()

            out = asyncio.run(soak())
        finally:
            stop(proc)
        t, rss = np.array(samples).T
        late = rss[t >= t.max() / 2]
        growth = late.max() - late.min()
        print(f"\nsoak {args.soak:.0f} s at 32 clients: {out['images_per_s']:.1f} img/s, statuses {out['statuses']}, resident memory "
              f"{rss.min():.0f}-{rss.max():.0f} MiB; second half {late.min():.0f}-{late.max():.0f} MiB; samples {[round(x) for x in rss]}")  # fmt: skip
        report("serve: resident memory growth over the soak's second half", float(growth), "MiB", target="flat (< 5% of RSS)",
               ok=bool(growth < 0.05 * late.max()))  # fmt: skip


if __name__ == "__main__":
    main()
