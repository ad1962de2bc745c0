"""python -m serve: every endpoint against the use it serves, batching, limits, keys, the bad-request table,
metrics; a real server process called by the openai client and httpx and stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import concurrent.futures
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, _free_port, python_m
from fastapi.testclient import TestClient
from PIL import Image

from anomaly import AnomalyDetector
from codec import Codec
from common.images import to_pil, to_uint8
from features import ImageSearch
from serve import Batcher, Limits, QueueFull, Service, create_app


def b64png(image: torch.Tensor | Image.Image) -> str:
    pil = image if isinstance(image, Image.Image) else to_pil(image[None])[0]
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def folders(chain, tmp_path_factory):
    """An anomaly folder (normal: Trouser, knn reference from the training split) and an image index."""
    root = tmp_path_factory.mktemp("serve")
    python_m("anomaly", "--prior", str(chain["prior"]), "--max-eval-samples", "300", "--max-train-samples", "2000",
             "--normal-classes", "Trouser", "--reference", "train", "--output-dir", str(root / "scores"))  # fmt: skip
    python_m("features", "index", "--tokenizer", str(chain["tokenizer"]), "--max-train-samples", "300", "--exact",
             "--output-dir", str(root / "index"))  # fmt: skip
    return {"scores": root / "scores", "index": root / "index"}


@pytest.fixture(scope="module")
def service(chain, folders):
    return Service.load(str(chain["prior"]), index=str(folders["index"]), anomaly=str(folders["scores"]))


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, page=False)) as c:
        yield c


@pytest.fixture(scope="module")
def images(fashion_batch):
    return fashion_batch[0][:6]


GEN = "/v1/images/generations"


def test_generation_is_the_pipelines(client, service):
    body = {"prompt": "Bag", "n": 3, "seed": 5, "response_format": "b64_json", "return_codes": True}
    r = client.post(GEN, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"created", "data", "seed"} and len(out["data"]) == 3 and out["seed"] == 5
    got = np.stack([pixels(d["b64_json"]) for d in out["data"]])
    assert got.shape == (3, 28, 28)
    # What the pipeline gives with the request's own RNG (the service adds transport, not sampling).
    g = torch.Generator().manual_seed(5)
    want_images, want_codes = service.pipe(["Bag"] * 3, generator=[g] * 3, return_codes=True)
    assert np.array_equal(got, to_uint8(want_images)[:, 0].numpy())
    assert [d["codes"] for d in out["data"]] == want_codes.tolist()
    # Settings that differ are batched apart, and still apply.
    greedy = client.post(GEN, json={"prompt": "Bag", "n": 2, "temperature": 0, "seed": 1}).json()
    again = client.post(GEN, json={"prompt": "Bag", "n": 2, "temperature": 0, "seed": 2}).json()
    assert greedy["data"][0]["b64_json"] == again["data"][1]["b64_json"]  # greedy ignores the seed


def test_concurrent_requests_coalesce_and_each_gets_its_own_images(chain):
    """Requests of other classes, seeds and sizes arriving together run as one model call, and each gets the
    images it gets alone."""
    service = Service.load(str(chain["prior"]), limits=Limits(batch_timeout=2.0))
    requests = [{"prompt": "Bag", "n": 3, "seed": 5}, {"prompt": "Sneaker", "n": 2, "seed": 1}, {"prompt": 0, "n": 4, "seed": 2},
                {"prompt": "Bag", "n": 1, "seed": 9}]  # fmt: skip
    with TestClient(create_app(service, page=False)) as c:
        alone = [c.post(GEN, json=body).json()["data"] for body in requests]
        before = batches(c.get("/metrics").text)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda body: c.post(GEN, json=body).json()["data"], requests))
        after = batches(c.get("/metrics").text)
    assert together == alone
    assert after[0] - before[0] == 1 and after[1] - before[1] == 10  # one call of all 10 images


def batches(metrics: str) -> tuple[float, float]:
    """(model calls, images) of the generation queue, from /metrics."""
    value = lambda name: float(next(x for x in metrics.splitlines() if x.startswith(name + '{queue="generate"}')).split()[-1])  # noqa: E731
    return value("vqgpt_batch_images_count"), value("vqgpt_batch_images_sum")


def test_encode_decode_are_the_tokenizers(client, service, images):
    r = client.post("/v1/encode", json={"images": [b64png(x) for x in images]})
    assert r.status_code == 200, r.text
    out = r.json()
    tok = service.tokenizer
    want = tok.code_layout(28, 28).flatten(tok.encode(images))
    assert out["codes"] == want.tolist() and out["levels"] == tok.num_levels
    r = client.post("/v1/decode", json={"codes": out["codes"]})
    assert r.status_code == 200, r.text
    got = np.stack([pixels(d["b64_json"]) for d in r.json()["data"]])
    assert np.array_equal(got, to_uint8(tok.decode(want))[:, 0].numpy())


def test_compress_decompress_are_the_codecs(client, service, images):
    r = client.post("/v1/compress", json={"images": [b64png(x) for x in images[:3]], "labels": ["Bag", None, 1]})
    assert r.status_code == 200, r.text
    files = r.json()["data"]
    codec = Codec(service.tokenizer, service.pipe.prior, service.pipe.info)
    for x, label, f in zip(images[:3], [8, -1, 1], files):
        assert base64.b64decode(f["data"]) == codec.compress(x, label) and f["bytes"] == len(base64.b64decode(f["data"]))
    r = client.post("/v1/decompress", json={"data": [f["data"] for f in files]})
    assert r.status_code == 200, r.text
    out = r.json()["data"]
    assert [d["label"] for d in out] == ["Bag", None, "Trouser"]
    for x, d in zip(images[:3], out):
        recon = service.tokenizer.decode(service.tokenizer.encode(x[None]))
        assert np.array_equal(pixels(d["b64_json"]), to_uint8(recon)[0, 0].numpy())


def test_anomaly_and_search_are_the_uses(client, service, folders, images):
    body = {"images": [b64png(x) for x in images]}
    r = client.post("/v1/anomaly", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    detector = AnomalyDetector.from_folder(str(folders["scores"]))
    scores, flags = detector(images)
    assert set(out["data"][0]["scores"]) == {"nll", "reconstruction", "combined", "knn"} and out["decisive"] == detector.decisive
    for i, row in enumerate(out["data"]):
        assert row["scores"] == pytest.approx({k: float(v[i]) for k, v in scores.items()}, rel=1e-5)
        assert row["flags"] == {k: bool(v[i]) for k, v in flags.items()} and row["anomalous"] == row["flags"][out["decisive"]]
    r = client.post("/v1/search", json={**body, "k": 4})
    assert r.status_code == 200, r.text
    distances, rows = ImageSearch.from_folder(str(folders["index"]))(images, 4)
    for found, ds, rs in zip(r.json()["data"], distances, rows):
        assert [n["id"] for n in found] == [f"train/{i}" for i in rs]
        assert [n["distance"] for n in found] == pytest.approx(ds.tolist(), rel=1e-5)


def test_health_and_metrics(client, images):
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["endpoints"]) >= {"generate", "encode", "anomaly", "search"}
    client.post("/v1/encode", json={"images": [b64png(x) for x in images]})
    client.post("/v1/anomaly", json={"images": [b64png(x) for x in images]})
    client.post("/v1/encode", json={"images": ["nope"]})
    text = client.get("/metrics").text
    for line in ('vqgpt_requests_total{endpoint="/v1/encode",status="200"}', 'vqgpt_requests_total{endpoint="/v1/encode",status="422"}',
                 'vqgpt_request_seconds_bucket{endpoint="/v1/encode",le="0.005",status="200"}', 'vqgpt_batch_images_count{queue="encode"}',
                 'vqgpt_queue_images{queue="encode"} 0.0', 'vqgpt_reconstruction_mse_count', 'vqgpt_codebook_usage{level="1"}',
                 'vqgpt_anomaly_images_total{anomalous=', "vqgpt_anomaly_flag_rate"):  # fmt: skip
        assert line in text, line
    usage = float(next(x for x in text.splitlines() if x.startswith('vqgpt_codebook_usage{level="1"}')).split()[-1])
    assert 0 < usage <= 1


def test_endpoints_without_their_model_and_the_key(chain, images):
    service = Service.load(tokenizer=str(chain["tokenizer"]))
    with TestClient(create_app(service, api_key="s3cret", page=False)) as c:
        key = {"Authorization": "Bearer s3cret"}
        assert c.get("/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/encode", json={"images": [b64png(images[0])]}, headers=headers)
            assert r.status_code == 401 and "Bearer" in r.json()["error"]
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=key).status_code == 200
        assert c.get("/openapi.json").status_code == 401 and "/v1/encode" in c.get("/openapi.json", headers=key).json()["paths"]
        for path, option in (("/v1/images/generations", "--prior"), ("/v1/anomaly", "--anomaly"), ("/v1/search", "--index")):
            body = {"prompt": "Bag"} if "generations" in path else {"images": [b64png(images[0])]}
            r = c.post(path, json=body, headers=key)
            assert r.status_code == 404 and option in r.json()["error"], r.text
        r = c.post("/v1/encode", json={"images": [b64png(images[0])]}, headers=key)
        assert r.status_code == 200
        r = c.post("/v1/decode", json={"codes": r.json()["codes"]}, headers=key)
        assert r.status_code == 422 and "grid" in r.json()["error"]  # a tokenizer alone needs the grid
        codes = c.post("/v1/encode", json={"images": [b64png(images[0])]}, headers=key).json()["codes"]
        assert c.post("/v1/decode", json={"codes": codes, "grid": [7, 7]}, headers=key).status_code == 200


def _png(size=(28, 28), mode="L") -> str:
    return b64png(Image.new(mode, size, 128))


def _codec_file(client, images) -> bytes:
    return base64.b64decode(client.post("/v1/compress", json={"images": [b64png(images[0])]}).json()["data"][0]["data"])


BAD_REQUESTS = [  # (name, path, JSON body or raw bytes, status, words the one-line error must hold)
    ("bad JSON", GEN, b'{"prompt": "Bag", "n": ', 422, ["body", "JSON"]),
    ("not an object", GEN, b"[1, 2]", 422, ["body"]),
    ("missing prompt", GEN, {"n": 1}, 422, ["prompt", "required"]),
    ("n mistyped", GEN, {"prompt": "Bag", "n": "three"}, 422, ["n", "integer", "three"]),
    ("unknown class", GEN, {"prompt": "Unicorn"}, 422, ["prompt", "Unicorn", "Sneaker"]),
    ("class id out of range", GEN, {"prompt": "12"}, 422, ["prompt", "12", "0..9"]),
    ("n 0", GEN, {"prompt": "Bag", "n": 0}, 422, ["n 0", "1 to 64"]),
    ("n above the cap", GEN, {"prompt": "Bag", "n": 65}, 422, ["n 65", "1 to 64"]),
    ("NaN guidance", GEN, b'{"prompt": "Bag", "guidance_scale": NaN}', 422, ["guidance_scale", "finite"]),
    ("infinite guidance", GEN, b'{"prompt": "Bag", "guidance_scale": Infinity}', 422, ["guidance_scale", "finite"]),
    ("negative temperature", GEN, {"prompt": "Bag", "temperature": -1}, 422, ["temperature", "greater than or equal to 0"]),
    ("top_p 0", GEN, {"prompt": "Bag", "top_p": 0}, 422, ["top_p", "greater than 0"]),
    ("response_format url", GEN, {"prompt": "Bag", "response_format": "url"}, 422, ["response_format", "b64_json"]),
    ("size of other models", GEN, {"prompt": "Bag", "size": "1024x1024"}, 422, ["size", "28x28"]),
    ("negative seed", GEN, {"prompt": "Bag", "seed": -1}, 422, ["seed"]),
    ("images not a list", "/v1/encode", {"images": "abc"}, 422, ["images", "list"]),
    ("no images", "/v1/encode", {"images": []}, 422, ["images: 0 images", "1 to 64"]),
    ("no codes", "/v1/decode", {"codes": []}, 422, ["codes: 0 rows", "1 to 64"]),
    ("empty code rows", "/v1/decode", {"codes": [[]]}, 422, ["codes", "at least one"]),
    ("65 images", "/v1/encode", {"images": ["x"] * 65}, 422, ["65 images", "1 to 64"]),
    ("not base64", "/v1/encode", {"images": ["%%%"]}, 422, ["images[0]", "base64"]),
    ("non-image bytes", "/v1/encode", {"images": [base64.b64encode(b"hello world").decode()]}, 422, ["images[0]", "not an image"]),
    ("truncated PNG", "/v1/encode", {"images": [_png()[:60]]}, 422, ["images[0]"]),
    ("wrong size", "/v1/encode", {"images": [_png((32, 32))]}, 422, ["images[0]", "32x32", "28x28"]),
    ("decompression bomb", "/v1/encode", {"images": [_png((2100, 2100))]}, 413, ["images[0]", "2100x2100", "pixels"]),
    ("RGB for a grayscale model", "/v1/encode", {"images": [_png(mode="RGB")]}, 422, ["images[0]", "colour", "grayscale", "image_channels 1"]),
    ("image_channels of another model", "/v1/encode", {"images": [_png()], "image_channels": 3}, 422, ["image_channels 3", "1 channel"]),
    ("levels above the tokenizer's", "/v1/encode", {"images": [_png()], "levels": 3}, 422, ["levels 3", "1 to 1"]),
    ("codes out of range", "/v1/decode", {"codes": [[0] * 48 + [99999]]}, 422, ["codes", "0.."]),
    ("codes beyond int64", "/v1/decode", {"codes": [[0] * 48 + [2**70]]}, 422, ["codes", "0.."]),
    ("unknown long prompt", GEN, {"prompt": "x" * 5000}, 422, ["prompt", "xxx"]),
    ("codes of no layout", "/v1/decode", {"codes": [[0] * 10]}, 422, ["codes", "10 codes"]),
    ("ragged codes", "/v1/decode", {"codes": [[0] * 49, [0] * 48]}, 422, ["codes", "different lengths"]),
    ("codes mistyped", "/v1/decode", {"codes": [["a"]]}, 422, ["codes.0.0", "integer"]),
    ("labels miscounted", "/v1/compress", {"images": [_png()], "labels": [1, 2]}, 422, ["labels", "2 for 1"]),
    ("truncated codec bytes", "/v1/decompress", "truncated", 422, ["data[0]", "damaged"]),
    ("bit-flipped codec bytes", "/v1/decompress", "flipped", 422, ["data[0]"]),
    ("not a codec file", "/v1/decompress", {"data": [base64.b64encode(b"\x89PNG" + bytes(40)).decode()]}, 422, ["data[0]", "not a vqgpt codec file"]),
    ("search k 0", "/v1/search", {"images": [_png()], "k": 0}, 422, ["k 0", "expected 1 to 300"]),
    ("search k above the index", "/v1/search", {"images": [_png()], "k": 301}, 422, ["k 301", "holds 300 images"]),
    ("oversized body", "/v1/encode", b'{"images": ["' + b"A" * (9 << 20) + b'"]}', 413, ["body", "bytes"]),
]


@pytest.mark.parametrize("name,path,body,status,words", BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests_get_one_line_4xx(client, images, name, path, body, status, words):
    if body in ("truncated", "flipped"):
        data = bytearray(_codec_file(client, images))
        data = data[: len(data) // 2] if body == "truncated" else data[:13] + bytes(b ^ 0x5A for b in data[13:])
        body = {"data": [base64.b64encode(bytes(data)).decode()]}
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]
    assert "\n" not in message and all(w in message for w in words), message
    assert client.get("/health").status_code == 200  # the worker lives on


def test_batcher_queue_bound_and_cancelled_requests():
    """Past max_queue rows: QueueFull; a cancelled request leaves the queue; requests of a key coalesce."""
    release, calls = threading.Event(), []

    def predict(key, rows):
        release.wait(10)
        calls.append((key, list(rows)))
        return [r * 10 for r in rows]

    async def scenario():
        b = Batcher("t", predict, concurrent.futures.ThreadPoolExecutor(1), max_batch_size=8, batch_timeout=0.01, max_queue=6)
        b.start()
        first = asyncio.create_task(b.submit("a", [1]))  # taken into a call that blocks until released
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(b.submit("a", [2, 3])), asyncio.create_task(b.submit("b", [4])),
                   asyncio.create_task(b.submit("a", [5]))]  # fmt: skip
        cancelled = asyncio.create_task(b.submit("a", [6, 7]))
        await asyncio.sleep(0.01)
        assert b.queued == 6
        with pytest.raises(QueueFull):
            await b.submit("a", [8])
        cancelled.cancel()
        await asyncio.sleep(0.01)
        release.set()
        results = [await first] + [await t for t in waiting]
        assert b.queued == 0
        assert await b.submit("a", [9] * 6) == [90] * 6  # the room came back
        await b.stop()
        return results

    assert asyncio.run(scenario()) == [[10], [20, 30], [40], [50]]
    assert calls[1] == ("a", [2, 3, 5]) and calls[2] == ("b", [4])  # same key together; the cancelled rows dropped


def test_a_full_queue_is_a_503_with_retry_after(chain):
    service = Service.load(str(chain["prior"]), limits=Limits(max_queue=2, max_batch_size=2))
    with TestClient(create_app(service, page=False)) as c:
        r = c.post(GEN, json={"prompt": "Bag", "n": 3})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "queue is full" in r.json()["error"]
        assert c.post(GEN, json={"prompt": "Bag", "n": 2}).status_code == 200


def test_host_beyond_loopback_needs_a_key(chain):
    proc = python_m("serve", "--prior", str(chain["prior"]), "--host", "0.0.0.0", check=False)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "0.0.0.0" in proc.stderr


def start_server(*args, env=None):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", *args, "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not answer /health in 120 s")


def test_real_server_openai_client_httpx_and_sigterm_drain(chain, images):
    from openai import OpenAI

    proc, url = start_server("--prior", str(chain["prior"]), "--no-page")
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        result = client.images.generate(prompt="Sneaker", n=2, response_format="b64_json", extra_body={"seed": 3})
        assert len(result.data) == 2 and pixels(result.data[0].b64_json).shape == (28, 28)
        r = httpx.post(url + "/v1/encode", json={"images": [b64png(x) for x in images[:2]]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["codes"]) == 2
        # SIGTERM while a request is in flight: it is answered, then the server exits 0.
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=httpx.post(url + GEN, json={"prompt": "Bag", "n": 64}, timeout=60)))
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["data"]) == 64
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_page_in_a_real_browser(chain, folders, images, tmp_path):
    """Headless Chromium (Debian's chromium and chromium-driver, make setup installs them) opens the page,
    picks a class, presses Generate and sees the images; nothing is fetched from outside the server. The
    other tabs' functions answer through Gradio's own client."""
    from gradio_client import Client, handle_file
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    proc, url = start_server("--prior", str(chain["prior"]), "--index", str(folders["index"]), "--anomaly", str(folders["scores"]))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Driver("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#class input"))
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("Sneaker")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li"))
        box.send_keys(Keys.ENTER)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        shown = wait.until(lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#gallery img") if i.get_attribute("naturalWidth") != "0"] or False)  # fmt: skip
        assert len(shown) >= 1
        assert box.get_attribute("value") == "Sneaker"
        browser.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("VQGPT_PAGE_SCREENSHOT"):
            browser.save_screenshot(os.environ["VQGPT_PAGE_SCREENSHOT"])
        hosts = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
        assert set(hosts) <= {url.removeprefix("http://")}, set(hosts)
        browser.get(url + "/docs")  # the API's schema page, its Swagger UI files served by the server itself
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 9)
        hosts = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
        assert set(hosts) <= {url.removeprefix("http://")}, set(hosts)
        upload = tmp_path / "upload.png"
        to_pil(images[:1])[0].save(upload)
        page = Client(url + "/", verbose=False)
        decoded, sizes = page.predict(handle_file(str(upload)), api_name="/compress")
        assert [row[0] for row in sizes["data"]] == ["vqgpt codec", "PNG (lossless)", "WebP (lossless)"] and Image.open(decoded).size == (112, 112)
        shown, table = page.predict(handle_file(str(upload)), 3, api_name="/search")
        assert len(shown) == 3 and [row[0] for row in table["data"]][0].startswith("train/")
        verdict, scores = page.predict(handle_file(str(upload)), api_name="/anomaly")
        assert ("anomalous" in verdict or "normal" in verdict) and [row[0] for row in scores["data"]] == ["nll", "reconstruction", "combined", "knn"]
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(60)
