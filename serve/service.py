"""The models a server answers with, loaded once, and what each endpoint does with them.

Every model call goes through a :class:`~serve.batching.Batcher` and runs on one model thread, one call at a
time. The methods here take the decoded request fields, check them (a :class:`RequestError` is a 4xx with
one line naming the field), and call the uses' public API: the sampler's pipeline, the tokenizer, the
codec, the anomaly detector, the image search. Nothing here samples, codes or scores by itself.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import io
import secrets
import time
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from anomaly import AnomalyDetector
from codec import Codec
from common.cli import UserError
from common.data import ImageTransform, to_float
from common.images import psnr, to_pil
from features import ImageSearch
from prior import load_prior
from sample import ClassConditionalPipeline
from tokenizer import VQVAE

from .batching import Batcher
from .metrics import Metrics


class RequestError(Exception):
    """A request the server cannot answer: an HTTP status and one line naming the field and what was expected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """What one request may ask for, and how many images may wait (docs/serving.md)."""

    max_images: int = 64  # images per request (n of a generation)
    max_body_bytes: int = 8 << 20  # a request body
    max_pixels: int = 1 << 22  # per uploaded image, read from its header before it is decoded
    max_batch_size: int = 64  # images per model call; 1: every request alone
    batch_timeout: float = 0.05  # at most this long, the oldest request waits for others of its kind while they keep coming
    max_queue: int = 512  # images waiting per endpoint; past it, 503


# Which start-up option makes each endpoint available, for the 404 of an endpoint without its model.
NEEDS = {"generate": "--prior", "anomaly": "--anomaly (a python -m anomaly output folder)",
         "search": "--index (a python -m features index folder)"}  # fmt: skip


def png_b64(image: torch.Tensor) -> str:
    """An image (C, H, W) in [-1, 1] -> base64 PNG."""
    buf = io.BytesIO()
    to_pil(image[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def b64_bytes(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{field}: not base64; expected base64-encoded bytes") from None


class Service:
    """The served models: a prior with its tokenizer (or a tokenizer alone), and optionally an anomaly
    folder's detector and an image index of the same tokenizer."""

    def __init__(self, tokenizer: VQVAE, pipe: ClassConditionalPipeline | None = None, detector: AnomalyDetector | None = None,
                 search: ImageSearch | None = None, limits: Limits | None = None, names: dict | None = None):  # fmt: skip
        self.tokenizer, self.pipe, self.detector, self.search_index = tokenizer.eval(), pipe, detector, search
        self.limits = limits or Limits()
        self.names = names or {}  # what was loaded, for /health
        self.codec = Codec(tokenizer, pipe.prior, pipe.info) if pipe is not None else Codec(tokenizer)
        self.channels = tokenizer.config.in_channels
        self.image_size = tuple(pipe.info.image_size) if pipe is not None and pipe.info.image_size else None
        self.metrics = Metrics(tokenizer.num_levels, tokenizer.config.num_codes)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vqgpt-model")
        lim = self.limits
        self.batchers = {name: Batcher(name, getattr(self, f"_{name}"), self.executor, lim.max_batch_size, lim.batch_timeout,
                                       lim.max_queue, self.metrics.batch)
                         for name in ("generate", "encode", "decode", "compress", "decompress", "anomaly", "search")}  # fmt: skip

    @classmethod
    def load(cls, prior: str | None = None, tokenizer: str | None = None, index: str | None = None, anomaly: str | None = None,
             device: str = "cpu", limits: Limits | None = None) -> Service:  # fmt: skip
        """Load every model once: ``prior`` (a folder or Hub id, and the tokenizer it names) or ``tokenizer``
        alone; ``index``: a python -m features index folder; ``anomaly``: a python -m anomaly output folder."""
        if prior is None and tokenizer is None:
            raise UserError("the server needs --prior (a train.prior folder or Hub id) or at least --tokenizer")
        pipe = None
        if prior is not None:
            model, info = load_prior(prior)
            tok = VQVAE.from_pretrained(tokenizer or info.tokenizer)
            pipe = ClassConditionalPipeline(model, tok, info).to(device)
        tok = pipe.tokenizer if pipe is not None else VQVAE.from_pretrained(tokenizer).to(device)
        detector = None
        if anomaly is not None:
            if pipe is None:
                raise UserError("--anomaly needs --prior: the anomaly scores are the prior's likelihood of the codes")
            detector = AnomalyDetector.from_folder(anomaly, prior, loaded=(tok, pipe.prior, pipe.info))
        search = ImageSearch.from_folder(index, tok) if index is not None else None
        names = {"prior": prior, "tokenizer": tokenizer or (pipe.info.tokenizer if pipe else None), "index": index, "anomaly": anomaly}
        return cls(tok, pipe, detector, search, limits, names)

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.executor.shutdown(wait=True)

    def queued(self) -> int:
        return sum(b.queued for b in self.batchers.values())

    def health(self) -> dict:
        return {"status": "ok", "models": {k: v for k, v in self.names.items() if v}, "queued_images": self.queued(),
                "endpoints": [name for name in self.batchers if self.available(name)]}  # fmt: skip

    def available(self, name: str) -> bool:
        return {"generate": self.pipe is not None, "anomaly": self.detector is not None, "search": self.search_index is not None}.get(name, True)  # fmt: skip

    def require(self, name: str) -> None:
        if not self.available(name):
            raise RequestError(404, f"this server was started without {NEEDS[name]}; restart it with that option to use /v1/{name}")

    # -- request fields -> tensors ---------------------------------------------------------------------------

    def count(self, n: int, field: str, unit: str | None = None) -> None:
        """A one-line 422 unless 1 <= n <= the images a request may ask for (``unit``: what ``n`` counts in ``field``)."""
        if not 1 <= n <= self.limits.max_images:
            given = f"{field}: {n} {unit};" if unit else f"{field} {n}:"
            raise RequestError(422, f"{given} expected 1 to {self.limits.max_images}")

    def class_id(self, prompt: str | int | None) -> int:
        """A class name or id (or None / '': unconditional) -> its id, -1 for the null class."""
        if prompt is None or prompt == "":
            return -1
        try:
            return self.pipe.class_ids([str(prompt)])[0]
        except ValueError as e:
            raise RequestError(422, f"prompt {str(prompt)[:60]!r}: {e}") from None

    def images(self, values: list[str], image_channels: int | None, field: str = "images") -> torch.Tensor:
        """Base64 images -> (N, C, H, W) in [-1, 1], by the colour rule of every command (docs/data.md)."""
        self.count(len(values), field, "images")
        if image_channels is not None and image_channels != self.channels:
            raise RequestError(422, f"image_channels {image_channels}: the tokenizer takes {self.channels} channel{'s' * (self.channels > 1)}")  # fmt: skip
        transform = ImageTransform(self.channels, convert=image_channels is not None, expected_by="the tokenizer",
                                   convert_option="image_channels")  # fmt: skip
        out = []
        for i, value in enumerate(values):
            name = f"{field}[{i}]"
            try:
                img = Image.open(io.BytesIO(b64_bytes(value, name)))
            except (UnidentifiedImageError, OSError):
                raise RequestError(422, f"{name}: not an image; expected a base64 PNG, JPEG or WebP") from None
            if img.width * img.height > self.limits.max_pixels:
                raise RequestError(413, f"{name} is {img.width}x{img.height}; at most {self.limits.max_pixels} pixels are read")
            if self.image_size and (img.height, img.width) != self.image_size:
                h, w = self.image_size
                raise RequestError(422, f"{name} is {img.width}x{img.height}; the models take {w}x{h} images")
            try:
                out.append(to_float(transform.pixels(img)))
            except (UserError, OSError) as e:
                raise RequestError(422, f"{name}: {e}".replace("image (in-memory bytes) ", "")) from None
        if len({tuple(x.shape) for x in out}) > 1:
            raise RequestError(422, f"{field}: images of different sizes; send images of one size per request")
        try:
            self.tokenizer.check_images(out[0][None])
        except ValueError as e:
            raise RequestError(422, f"{field}: {e}") from None
        return torch.stack(out)

    # -- endpoints -------------------------------------------------------------------------------------------

    async def generate(self, prompt, n: int, settings: dict, seed: int | None, return_codes: bool) -> dict:
        self.require("generate")
        self.count(n, "n")
        label = self.class_id(prompt)
        resolved = self.pipe.sampling_settings(**settings)
        seed = secrets.randbits(63) if seed is None else seed
        g = torch.Generator().manual_seed(seed)  # the request's own RNG: its images do not depend on its batch
        out = await self.batchers["generate"].submit(tuple(sorted(resolved.items())), [(label, g)] * n)
        data = [{"b64_json": png_b64(image), **({"codes": codes.tolist()} if return_codes else {})} for image, codes in out]
        return {"created": int(time.time()), "data": data, "seed": seed}

    def _generate(self, key, rows):
        images, codes = self.pipe([label for label, _ in rows], generator=[g for _, g in rows], batch_size=len(rows),
                                  return_codes=True, **dict(key))  # fmt: skip
        return list(zip(images, codes))

    async def encode(self, images: list[str], levels: int | None, image_channels: int | None) -> dict:
        x = self.images(images, image_channels)
        try:
            d = self.tokenizer.code_layout(*x.shape[-2:]).levels(levels)
        except ValueError as e:
            raise RequestError(422, str(e).replace("levels=", "levels ")) from None
        codes = await self.batchers["encode"].submit((d, *x.shape[1:]), list(x))
        layout = self.tokenizer.code_layout(*x.shape[-2:])
        return {"codes": [c.tolist() for c in codes], "levels": d, "layout": layout.to_json()[:d]}

    def _encode(self, key, rows):
        d, x = key[0], torch.stack(rows)
        codes = self.tokenizer.code_layout(*x.shape[-2:]).flatten(self.tokenizer.encode(x, d), d)
        self._observe(x, codes, d)
        return list(codes)

    def _observe(self, x: torch.Tensor, codes: torch.Tensor, levels: int, recon: torch.Tensor | None = None) -> None:
        """The dashboard's figures of images served: their reconstruction error (``recon``: the reconstructions,
        if the caller has them already) and the codes they use."""
        if recon is None:
            recon = self.tokenizer.decode(codes, levels=levels, grid=self.tokenizer.code_grid(*x.shape[-2:]))
        self.metrics.served(((recon - x) ** 2).flatten(1).mean(1).tolist(), self.tokenizer.code_layout(*x.shape[-2:]).split(codes, levels))

    async def decode(self, codes: list[list[int]], grid: list[int] | None) -> dict:
        self.count(len(codes), "codes", "rows")
        if len({len(c) for c in codes}) > 1:
            raise RequestError(422, "codes: rows of different lengths; send rows of one length per request")
        k = self.tokenizer.config.num_codes
        if not codes[0] or any(not 0 <= v < k for row in codes for v in row):
            raise RequestError(422, f"codes: expected ids in 0..{k - 1}, at least one per row")
        t = torch.tensor(codes, dtype=torch.long)
        if grid is None and self.pipe is None:
            raise RequestError(422, "grid: required without --prior; expected the [h, w] of the code grid")
        grid = tuple(grid or self.pipe.info.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise RequestError(422, f"grid {list(grid)}: expected [h, w], two positive integers")
        f = self.tokenizer.downsample_factor
        try:
            levels = self.tokenizer.code_layout(grid[0] * f, grid[1] * f).levels_of(t.shape[1])
        except ValueError as e:
            raise RequestError(422, f"codes: {e}") from None
        images = await self.batchers["decode"].submit((grid, levels), list(t))
        return {"data": [{"b64_json": png_b64(x)} for x in images]}

    def _decode(self, key, rows):
        grid, levels = key
        return list(self.tokenizer.decode(torch.stack(rows), levels=levels, grid=grid))

    async def compress(self, images: list[str], labels: list | None, image_channels: int | None) -> dict:
        x = self.images(images, image_channels)
        labels = [None] * len(x) if labels is None else labels
        if len(labels) != len(x):
            raise RequestError(422, f"labels: {len(labels)} for {len(x)} images; expected one per image, or none")
        ids = [self.class_id(label) if self.pipe is not None else -1 for label in labels]
        try:
            self.codec.grid(tuple(x.shape[-2:]))
        except UserError as e:
            raise RequestError(422, f"images: {e}") from None
        out = await self.batchers["compress"].submit(None, list(zip(x, ids)))
        return {"data": [{"data": base64.b64encode(data).decode(), "bytes": len(data), "psnr": p} for data, p in out],
                "levels": self.codec.coded_levels}  # fmt: skip

    def _compress(self, key, rows):
        x = torch.stack([image for image, _ in rows])
        codes = torch.as_tensor(self.codec.encode_images(x))
        grid = self.codec.grid(tuple(x.shape[-2:]))
        files = [self.codec.compress_codes(c.numpy(), label, grid) for c, (_, label) in zip(codes, rows)]
        recon = self.codec.decode_codes(codes.numpy(), grid)
        self._observe(x, codes, self.codec.coded_levels, recon)
        return list(zip(files, psnr(recon, x).tolist()))

    async def decompress(self, data: list[str]) -> dict:
        self.count(len(data), "data", "files")
        files = [b64_bytes(d, f"data[{i}]") for i, d in enumerate(data)]
        out = await self.batchers["decompress"].submit(None, files)
        results = []
        for i, result in enumerate(out):
            if isinstance(result, Exception):
                raise RequestError(422, f"data[{i}]: {result}")
            image, label = result
            name = self.pipe.class_names[label] if self.pipe is not None and label >= 0 else None
            results.append({"b64_json": png_b64(image), "label": name})
        return {"data": results}

    def _decompress(self, key, rows):
        out = []
        for data in rows:
            try:
                codes, label, grid = self.codec.decompress_codes(data, "the file")
                out.append((self.codec.decode_codes(codes[None], grid)[0], label))
            except (UserError, ValueError) as e:  # a damaged file is the request's error, not the batch's
                out.append(e)
        return out

    async def anomaly(self, images: list[str], image_channels: int | None) -> dict:
        self.require("anomaly")
        x = self.images(images, image_channels)
        out = await self.batchers["anomaly"].submit(None, list(x))
        decisive = self.detector.decisive
        return {"data": out, "decisive": decisive, "thresholds": self.detector.thresholds}

    def _anomaly(self, key, rows):
        scores, flags = self.detector(torch.stack(rows))
        decisive = flags[self.detector.decisive]
        self.metrics.anomalies(decisive.tolist(), scores["reconstruction"].tolist())
        return [{"scores": {k: float(v[i]) for k, v in scores.items()}, "flags": {k: bool(v[i]) for k, v in flags.items()},
                 "anomalous": bool(decisive[i])} for i in range(len(rows))]  # fmt: skip

    async def search(self, images: list[str], k: int, image_channels: int | None) -> dict:
        self.require("search")
        try:
            self.search_index.check_k(k)
        except UserError as e:
            raise RequestError(422, str(e)) from None
        x = self.images(images, image_channels)
        return {"data": await self.batchers["search"].submit(k, list(x))}

    def _search(self, k, rows):
        distances, found = self.search_index(torch.stack(rows), k)
        s = self.search_index
        return [[{"id": s.ids[i], "label": s.label(i), "distance": float(d)} for d, i in zip(ds, rs)] for ds, rs in zip(distances, found)]
