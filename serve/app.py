"""The HTTP API over a :class:`~serve.service.Service`: routes, request schemas, limits, keys and errors.

Every answer that is not a success is a 4xx or 503 with ``{"error": "<one line naming the field and what
was expected>"}``; a 500 is a bug. The generation route takes the OpenAI images API's request and returns
its response, so that the official ``openai`` client works unchanged (docs/serving.md).
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from .batching import QueueFull
from .service import RequestError, Service

log = logging.getLogger("vqgpt.serve")

ENDPOINTS = ("/v1/images/generations", "/v1/encode", "/v1/decode", "/v1/compress", "/v1/decompress", "/v1/anomaly",
             "/v1/search", "/health", "/metrics")  # fmt: skip
OPEN = ("/health",)  # answered without the key


def finite(default=None, **kw):
    return Field(default, allow_inf_nan=False, **kw)


class GenerationRequest(BaseModel):
    """OpenAI's images request (``prompt``, ``n``, ``response_format``; ``model``, ``size`` and the rest are
    accepted and ignored where they cannot apply) and vqgpt's sampling fields."""

    prompt: str | int = Field(..., description="A class name or id of the prior; '' for an unconditional image.")
    n: int = Field(1, description="Images to generate.")
    response_format: Literal["b64_json"] = Field("b64_json", description="Images come back inline as base64 PNG.")
    size: str | None = Field(None, description="'auto' or the models' own size (e.g. '28x28').")
    guidance_scale: float | None = finite(ge=0, description="Classifier-free guidance; unset: the prior's own.")
    temperature: float | None = finite(ge=0, description="Softmax temperature, 0 = greedy; unset: the prior's own.")
    top_k: int | None = Field(None, ge=0, description="Keep the k most likely codes, 0 = all; unset: the prior's own.")
    top_p: float | None = finite(gt=0, le=1, description="Nucleus filtering, 1 = none; unset: the prior's own.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="The same request with the same seed gives the same images.")
    return_codes: bool = Field(False, description="Also return each image's codes.")


class ImagesRequest(BaseModel):
    images: list[str] = Field(..., description="Base64 images (PNG, JPEG, WebP) of the models' size.")
    image_channels: Literal[1, 3] | None = Field(None, description="Convert every image to the tokenizer's channels (the colour rule).")


class EncodeRequest(ImagesRequest):
    levels: int | None = Field(None, description="Of multi-level codes, the first `levels` levels; unset: all.")


class DecodeRequest(BaseModel):
    codes: list[list[int]] = Field(..., description="Rows of code ids: the first levels of the layout, level after level.")
    grid: list[int] | None = Field(None, description="[h, w] of the code grid; unset: the prior's.")


class CompressRequest(ImagesRequest):
    labels: list[str | int | None] | None = Field(None, description="Class of each image (a better code length); unset: none.")


class DecompressRequest(BaseModel):
    data: list[str] = Field(..., description="Base64 files made by /v1/compress or python -m codec compress.")


class SearchRequest(ImagesRequest):
    k: int = Field(10, description="Neighbours per image.")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_line(exc: RequestValidationError) -> str:
    """pydantic's first error as one line: the field, what was wrong, and what was given."""
    e = exc.errors()[0]
    field = ".".join(str(p) for p in e["loc"][1:]) or "body"
    if e["type"] == "json_invalid":
        return f"body: not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})"
    if e["type"] == "missing":
        return f"{field}: required"
    given = repr(e.get("input"))
    return f"{field}: {e['msg']}; got {given[:60] + '...' if len(given) > 60 else given}"


class Guard:
    """ASGI middleware before the routes: the body cap (413), the bearer key (401), and request metrics."""

    def __init__(self, app, service: Service, api_key: str | None):
        self.app, self.service, self.api_key = app, service, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]
        endpoint = path if path in ENDPOINTS else None  # the page's own routes are not counted

        async def respond(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            cap = self.service.limits.max_body_bytes
            if self.api_key and (endpoint and path not in OPEN or path in ("/docs", "/redoc", "/openapi.json")):
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    return await error(401, "Authorization: expected 'Bearer <key>' with this server's key",
                                       {"WWW-Authenticate": "Bearer"})(scope, receive, respond)  # fmt: skip
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > cap):
                return await error(413, f"body of {length.decode()} bytes; at most {cap} are read")(scope, receive, respond)
            seen = 0

            async def counted():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, f"body of more than {cap} bytes; at most {cap} are read")
                return message

            await self.app(scope, counted, respond)
        finally:
            if endpoint:
                self.service.metrics.request(endpoint, status[0], time.perf_counter() - start)


def create_app(service: Service, api_key: str | None = None, page: bool = True) -> FastAPI:
    """The FastAPI app: the API, /health, /metrics and (``page``) the Gradio page at /."""

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    # The schema's pages (/docs, /redoc) with Swagger UI's and ReDoc's files served from here, not from a CDN.
    app = FastAPIOffline(title="vqgpt", summary="Generate, encode, decode, compress, score and search images with a vqgpt tokenizer and prior.",
                  lifespan=lifespan)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return error(422, validation_line(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestError)
    async def _request(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}".replace("\n", " "))

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest):
        """Class-conditional images, as the OpenAI images API answers: ``{"created", "data": [{"b64_json"}]}``."""
        size = service.image_size
        if body.size not in (None, "auto") and size and body.size != f"{size[1]}x{size[0]}":
            raise RequestError(422, f"size {body.size!r}: these models make {size[1]}x{size[0]} images")
        settings = dict(guidance_scale=body.guidance_scale, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        return await service.generate(body.prompt, body.n, settings, body.seed, body.return_codes)

    @app.post("/v1/encode")
    async def encode(body: EncodeRequest):
        """Images -> codes (rows of the first ``levels`` levels, level after level) and their layout."""
        return await service.encode(body.images, body.levels, body.image_channels)

    @app.post("/v1/decode")
    async def decode(body: DecodeRequest):
        """Codes -> base64 PNGs."""
        return await service.decode(body.codes, body.grid)

    @app.post("/v1/compress")
    async def compress(body: CompressRequest):
        """Images -> codec files (base64), their sizes and the PSNR of what they decode to."""
        return await service.compress(body.images, body.labels, body.image_channels)

    @app.post("/v1/decompress")
    async def decompress(body: DecompressRequest):
        """Codec files -> base64 PNGs (exactly the tokenizer's reconstructions) and their classes."""
        return await service.decompress(body.data)

    @app.post("/v1/anomaly")
    async def anomaly(body: ImagesRequest):
        """Images -> the four anomaly scores, a flag per score at its threshold, and the verdict of the decisive score."""
        return await service.anomaly(body.images, body.image_channels)

    @app.post("/v1/search")
    async def search(body: SearchRequest):
        """Images -> the ``k`` nearest indexed images of each: id, class, distance."""
        return await service.search(body.images, body.k, body.image_channels)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4")

    if page:
        from .page import mount_page

        app = mount_page(app, service, api_key)
    app.add_middleware(Guard, service=service, api_key=api_key)
    return app
