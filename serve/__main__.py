"""Serve a prior and its tokenizer over HTTP, with a web page (docs/serving.md).

    python -m serve --prior runs/demo/prior [--index runs/index] [--anomaly runs/scores] [--host 127.0.0.1] [--port 8000]

loads the models once and answers /v1/images/generations (the OpenAI images API), /v1/encode, /v1/decode,
/v1/compress, /v1/decompress, /v1/anomaly, /v1/search, /health and /metrics (Prometheus), with the page at
/ and the API's schema at /docs. Concurrent requests are batched into one model call. SIGTERM (or Ctrl-C)
stops accepting, answers the requests in flight, and exits 0.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from dataclasses import dataclass

import torch

from common.cli import UsageError, option, parse_args, run_main

from .service import Limits, Service

_LIMITS = Limits()


@dataclass
class ServeArguments:
    prior: str | None = option(None, "Prior folder or Hub id (and the tokenizer it names).")
    tokenizer: str | None = option(None, "Tokenizer folder or Hub id: with --prior, overrides the one it names; alone, serves encode, decode and the codec without a prior.")  # fmt: skip
    index: str | None = option(None, "A python -m features index folder of the same tokenizer: starts /v1/search.")
    anomaly: str | None = option(None, "A python -m anomaly --normal-classes output folder of the same prior: starts /v1/anomaly.")
    host: str = option("127.0.0.1", "Address to listen on; another than loopback needs --api-key.")
    port: int = option(8000, "Port to listen on.", domain="non-negative")
    api_key: str | None = option(None, "Bearer key every endpoint but /health requires (default: $VQGPT_API_KEY); the page asks for it.")  # fmt: skip
    max_images: int = option(_LIMITS.max_images, "Images per request (n of a generation).", domain="positive")
    max_body_bytes: int = option(_LIMITS.max_body_bytes, "Largest request body read.", domain="positive")
    max_pixels: int = option(_LIMITS.max_pixels, "Largest uploaded image, in pixels, read from its header before decoding.", domain="positive")  # fmt: skip
    max_batch_size: int = option(_LIMITS.max_batch_size, "Images per model call; 1 serves every request alone.", domain="positive")
    batch_timeout: float = option(_LIMITS.batch_timeout, "At most this many seconds the oldest waiting request waits for others to batch with, while they keep coming (each within a tenth of it).", domain="non-negative")  # fmt: skip
    max_queue: int = option(_LIMITS.max_queue, "Images waiting per endpoint; past it, 503 with Retry-After.", domain="positive")
    no_page: bool = option(False, "Serve the API only, without the web page.")
    threads: int = option(0, "torch threads of the model calls; 0: all of torch's but one, which the HTTP side keeps.", domain="non-negative")  # fmt: skip
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "Device of the models.")

    def validate(self) -> None:
        self.api_key = self.api_key or os.environ.get("VQGPT_API_KEY") or None
        if self.prior is None and self.tokenizer is None:
            raise UsageError("--prior is required (a train.prior folder or Hub id), or --tokenizer to serve a tokenizer alone")
        if not loopback(self.host) and not self.api_key:
            raise UsageError(f"--host {self.host}: listening beyond this machine needs --api-key (or VQGPT_API_KEY)")
        if self.max_batch_size > self.max_queue:
            raise UsageError(f"--max-batch-size {self.max_batch_size}: expected at most --max-queue ({self.max_queue})")

    def limits(self) -> Limits:
        return Limits(self.max_images, self.max_body_bytes, self.max_pixels, self.max_batch_size, self.batch_timeout, self.max_queue)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None):
    (args,) = parse_args((ServeArguments,), argv)
    import uvicorn

    from .app import create_app

    # The event loop (JSON, base64, PNG) runs beside the model thread; a core of its own keeps it from
    # stalling the model's threads and the model's from stalling it (bench/serve.py measures --threads).
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    service = Service.load(args.prior, args.tokenizer, args.index, args.anomaly, args.device, args.limits())
    app = create_app(service, args.api_key, page=not args.no_page)
    print(f"vqgpt serving {', '.join(service.health()['endpoints'])} on http://{args.host}:{args.port} (page at /, API at /docs)", flush=True)
    # uvicorn drains the requests in flight on SIGTERM, then raises the signal again for the handler it found:
    # this one, so that a drained server exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    run_main(main)
