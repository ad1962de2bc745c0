"""vqgpt as a service: one process loads a prior and its tokenizer once and answers HTTP, with a web page.

    python -m serve --prior runs/demo/prior --index runs/index --anomaly runs/scores

The service calls the uses' public API (sample, codec, anomaly, features); what it adds is transport,
batching of concurrent requests, limits, keys and metrics (docs/serving.md).
"""

from .batching import Batcher, QueueFull
from .service import Limits, RequestError, Service

__all__ = ["Batcher", "Limits", "QueueFull", "RequestError", "Service", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app over a :class:`Service` (serve.app.create_app; imported on use: FastAPI and Gradio are the serve extra)."""
    from .app import create_app as create

    return create(*args, **kwargs)
