"""The web page at /: a Gradio Blocks app on the same server, over the same service methods as the API
(so its requests are batched, limited and counted with the others). Offline: system fonts, no analytics,
no share link. With an API key, the page asks for it (Gradio's login; any user name)."""

from __future__ import annotations

import base64
import hmac
import io
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from common.images import to_pil  # noqa: E402

from .service import RequestError, Service  # noqa: E402

THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _size(image: Image.Image, fmt: str, **kw) -> int:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.tell()


def _call(coroutine):
    """A service call from the page: its one-line error becomes the page's error message."""

    async def run():
        try:
            return await coroutine
        except RequestError as e:
            raise gr.Error(str(e)) from None

    return run()


def build(service: Service) -> gr.Blocks:
    pipe = service.pipe
    channels = service.channels

    def upload(image: Image.Image | None) -> str:
        if image is None:
            raise gr.Error("upload an image first")
        return _b64(image.convert("L" if channels == 1 else "RGB"))

    async def generate(name, guidance, seed, count):
        out = await _call(service.generate(name, int(count), {"guidance_scale": guidance}, int(seed or 0), False))
        return [_image(d["b64_json"]).resize((112, 112), Image.NEAREST) for d in out["data"]]

    async def compress(image):
        b64 = upload(image)
        out = (await _call(service.compress([b64], None, channels)))["data"][0]
        decoded = (await _call(service.decompress([out["data"]])))["data"][0]
        sent = _image(b64)
        table = [["vqgpt codec", out["bytes"], f"{out['psnr']:.2f} dB"], ["PNG (lossless)", _size(sent, "PNG", optimize=True), "exact"],
                 ["WebP (lossless)", _size(sent, "WEBP", lossless=True, quality=100, method=6), "exact"]]  # fmt: skip
        return _image(decoded["b64_json"]).resize((112, 112), Image.NEAREST), table

    async def search(image, k):
        out = (await _call(service.search([upload(image)], int(k), channels)))["data"][0]
        found = service.search_index.source_images([n["id"] for n in out])
        pictures = [(p.resize((84, 84), Image.NEAREST), f"{n['label']} {n['distance']:.2f}") for p, n in zip(to_pil(found), out)]
        return pictures, [[n["id"], n["label"], round(n["distance"], 4)] for n in out]

    async def anomaly(image):
        out = await _call(service.anomaly([upload(image)], channels))
        row = out["data"][0]
        verdict = f"**{'anomalous' if row['anomalous'] else 'normal'}** by the `{out['decisive']}` score"
        return verdict, [[k, round(v, 5), round(out["thresholds"][k], 5), row["flags"][k]] for k, v in row["scores"].items()]

    with gr.Blocks(title="vqgpt", analytics_enabled=False) as page:
        gr.Markdown("# vqgpt\nA VQ-VAE tokenizer and its prior, served. The same models answer the HTTP API (`/docs`).")
        with gr.Tab("Generate"):
            if pipe is None:
                gr.Markdown("Start the server with `--prior` to generate images.")
            else:
                with gr.Row():
                    name = gr.Dropdown(pipe.class_names, value=pipe.class_names[0], label="class", elem_id="class")
                    guidance = gr.Slider(0, 5, value=pipe.sampling_settings()["guidance_scale"], step=0.1, label="guidance")
                    seed = gr.Number(0, precision=0, minimum=0, label="seed")
                    count = gr.Slider(1, min(16, service.limits.max_images), value=8, step=1, label="images")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="samples", columns=8, elem_id="gallery")
                go.click(generate, [name, guidance, seed, count], gallery)
        with gr.Tab("Compress"):
            with gr.Row():
                original = gr.Image(type="pil", label="image", image_mode=None)
                decoded = gr.Image(type="pil", label="decoded", interactive=False)
            sizes = gr.Dataframe(headers=["format", "bytes", "PSNR"], label="sizes", interactive=False)
            gr.Button("Compress").click(compress, original, [decoded, sizes])
        with gr.Tab("Search"):
            if service.search_index is None:
                gr.Markdown("Start the server with `--index` (a `python -m features index` folder) to search.")
            else:
                with gr.Row():
                    query = gr.Image(type="pil", label="query")
                    k = gr.Slider(1, min(32, len(service.search_index.index)), value=8, step=1, label="neighbours")
                found = gr.Gallery(label="nearest", columns=8)
                table = gr.Dataframe(headers=["image", "class", "distance"], interactive=False)
                gr.Button("Search").click(search, [query, k], [found, table])
        with gr.Tab("Anomaly"):
            if service.detector is None:
                gr.Markdown("Start the server with `--anomaly` (a `python -m anomaly --normal-classes ...` folder) to score images.")
            else:
                scored = gr.Image(type="pil", label="image")
                verdict = gr.Markdown()
                scores = gr.Dataframe(headers=["score", "value", "threshold", "above"], interactive=False)
                gr.Button("Score").click(anomaly, scored, [verdict, scores])
    return page


def mount_page(app, service: Service, api_key: str | None):
    auth = (lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(app, build(service), path="/", auth=auth, theme=THEME, ssr_mode=False, mcp_server=False,
                               footer_links=[])  # fmt: skip
