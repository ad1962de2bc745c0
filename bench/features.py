"""Features of a tokenizer under the standard protocols, beside raw pixels and PCA-50 in the same run
(docs/features.md): clustering all 70k Fashion-MNIST images (k-means, and N2D's UMAP + Gaussian mixture), the linear probe, few labels, and image
search (precision@10 of the 10k test images against the 60k training index; and the vector-search
libraries compared on the same vectors).

    python -m bench.features --tokenizer runs/demo/tokenizer [--out runs/features-bench]
        [--protocols search,libraries,few,probe,clustering,n2d] [--features pixels,pca50,encoder,...]
        [--cluster-seeds 10 --n-init 20] [--n2d-seeds 3] [--seeds 10]

Every cell (protocol, feature) is kept in OUT/results.json as it finishes, so a run can be resumed or
extended; the table is printed from it at the end. Published clustering anchors (accuracy / NMI, same
protocol): k-means on pixels 0.47 / 0.51, autoencoder + k-means 0.61 / 0.64, DEC 0.62 / 0.65,
ClusterGAN 0.61 / 0.62, N2D 0.67 / 0.68; the dataset's benchmark: an RBF SVM on pixels 0.897.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from bench.common import machine, report
from common.data import DataArguments, load_image_data, load_tensors
from features import CodeBag, FeatureExtractor, FeatureIndex, clustering, few_labels, linear_probe, precision_at_k
from tokenizer import VQVAE

PROTOCOLS = ("search", "libraries", "few", "probe", "clustering", "n2d")
BASELINES = ("pixels", "pca50")
ANCHORS = {"k-means on pixels": (0.47, 0.51), "AE + k-means": (0.61, 0.64), "DEC": (0.62, 0.65), "ClusterGAN": (0.61, 0.62), "N2D": (0.67, 0.68)}


def load_features(tokenizer: str, names: list[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """{name: (train rows, test rows)}, train labels, test labels. ``codes`` is the bag of the whole grid,
    ``codes_pyramid`` with its quadrants; ``encoder_pca50`` is PCA-50 of ``encoder``; IDF and PCA are
    fitted on the training rows."""
    data = load_image_data(DataArguments())
    (xtr, ytr), (xte, yte) = load_tensors(data.train, 1), load_tensors(data.test, 1)
    out = {"pixels": (xtr.flatten(1).numpy(), xte.flatten(1).numpy())}
    if "pca50" in names:
        pca = PCA(50, random_state=0).fit(out["pixels"][0])
        out["pca50"] = tuple(pca.transform(x).astype(np.float32) for x in out["pixels"])
    tok = VQVAE.from_pretrained(tokenizer)
    pyramid = "codes_pyramid" in names
    extractor = FeatureExtractor(tok, pyramid=pyramid)
    raw = [extractor.extract(xtr), extractor.extract(xte)]  # one pass: the whole grids' counts are among the pyramid's
    out |= {n: (raw[0][n], raw[1][n]) for n in raw[0] if n != "counts"}
    counts = [r.pop("counts") for r in raw]
    # each level's counts are its whole grid, then (with the pyramid) its four quadrants (features.code_counts)
    whole = [c.reshape(len(c), -1, 5, tok.config.num_codes)[:, :, 0].reshape(len(c), -1) for c in counts] if pyramid else counts
    for name, c in (("codes", whole), ("codes_pyramid", counts if pyramid else None)):
        if name in names:
            bag = CodeBag().fit(c[0])
            out[name] = tuple(bag.transform(part) for part in c)
    if "encoder_pca50" in names:
        pca = PCA(50, random_state=0).fit(out["encoder"][0])
        out["encoder_pca50"] = tuple(pca.transform(x).astype(np.float32) for x in out["encoder"])
    missing = [n for n in names if n not in out]
    if missing:
        raise SystemExit(f"--features {','.join(missing)}: expected some of {', '.join(out)}")
    return {n: out[n] for n in names}, ytr.numpy(), yte.numpy()


def search_libraries(train: np.ndarray, test: np.ndarray, k: int = 10) -> dict[str, dict]:
    """Build seconds, index bytes, queries per second and recall@k against exact search, per library."""
    import faiss

    train, test = (np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32) for x in (train, test))
    rows = {}
    t = time.perf_counter()
    exact = NearestNeighbors(n_neighbors=k).fit(train)
    build = time.perf_counter() - t
    t = time.perf_counter()
    truth = exact.kneighbors(test, return_distance=False)
    rows["scikit-learn exact"] = {"build_s": build, "bytes": train.nbytes, "qps": len(test) / (time.perf_counter() - t), "recall": 1.0}

    def add(name, build_fn, query_fn, size):
        t = time.perf_counter()
        index = build_fn()
        build = time.perf_counter() - t
        t = time.perf_counter()
        found = query_fn(index)
        qps = len(test) / (time.perf_counter() - t)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)])
        rows[name] = {"build_s": build, "bytes": size(index), "qps": qps, "recall": float(recall)}

    def faiss_build(exact_index):
        return lambda: FeatureIndex(train.shape[1], "l2", exact_index).add(train)

    size = lambda ix: len(faiss.serialize_index(ix.index))  # noqa: E731
    add("faiss exact (flat)", faiss_build(True), lambda ix: ix.search(test, k)[1], size)
    add("faiss HNSW M16 ef64 (vqgpt)", faiss_build(False), lambda ix: ix.search(test, k)[1], size)
    try:
        import hnswlib

        def hnsw():
            ix = hnswlib.Index(space="l2", dim=train.shape[1])
            ix.init_index(len(train), M=16, ef_construction=100)
            ix.add_items(train)
            ix.set_ef(64)
            return ix

        add("hnswlib M16 ef64", hnsw, lambda ix: ix.knn_query(test, k)[0], lambda ix: ix.index_file_size())
    except ImportError:
        print("hnswlib not installed: skipped")
    try:
        from usearch.index import Index

        def usearch():
            ix = Index(ndim=train.shape[1], metric="l2sq", connectivity=16, expansion_add=100, expansion_search=64)
            ix.add(np.arange(len(train)), train)
            return ix

        add("usearch M16 ef64", usearch, lambda ix: ix.search(test, k).keys, lambda ix: ix.memory_usage)
    except ImportError:
        print("usearch not installed: skipped")
    return rows


def run_cell(protocol: str, name: str, feats, ytr, yte, args) -> dict:
    train, test = feats[name]
    if protocol == "search":
        index = FeatureIndex(train.shape[1], "cosine").add(train)
        t = time.perf_counter()
        rows = index.search(test, 10)[1]
        qps = len(test) / (time.perf_counter() - t)
        return {"precision_at_10": precision_at_k(ytr[rows], yte), "qps": qps}
    if protocol == "libraries":
        return search_libraries(train, test)
    if protocol == "few":
        return {str(n): few_labels(train, ytr, test, yte, n, range(args.seeds)) for n in (10, 100)}
    if protocol == "probe":
        return linear_probe(train, ytr, test, yte, max_iter=args.probe_max_iter) | {"max_iter": args.probe_max_iter}
    if protocol == "clustering":
        x, y = np.concatenate([train, test]), np.concatenate([ytr, yte])
        return clustering(x, y, 10, args.n_init, range(args.cluster_seeds)) | {"n_init": args.n_init}
    if protocol == "n2d":  # N2D's recipe over all 70k images: PCA-50, UMAP to 10 (20 neighbours, min_dist 0), GMM
        x, y = np.concatenate([train, test]), np.concatenate([ytr, yte])
        return clustering(x, y, 10, seeds=range(args.n2d_seeds), method="n2d")
    raise ValueError(protocol)


def print_tables(results: dict) -> None:
    def cell(p, n):
        return results.get(f"{p}/{n}")

    names = list(dict.fromkeys(k.split("/", 1)[1] for k in results))
    print("\n| feature | clustering acc | NMI | ARI | linear probe | 10/class LR | 10/class 1-NN | 100/class LR | 100/class 1-NN | 100/class 10-NN | precision@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        c, p, f, s = cell("clustering", n), cell("probe", n), cell("few", n), cell("search", n)
        ms = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}" + (f" ({d['runs']} seed{'s' * (d['runs'] > 1)})" if d["runs"] != 10 else "")  # noqa: E731
        row = [ms(c["accuracy"]), ms(c["nmi"]), ms(c["ari"])] if c else ["-"] * 3
        row += [f"{p['accuracy']:.4f} (C={p['c']:g})" if p else "-"]
        row += [ms(f[s_][k]) for s_, k in (("10", "logistic"), ("10", "knn1"), ("100", "logistic"), ("100", "knn1"), ("100", "knn10"))] if f else ["-"] * 5
        row += [f"{s['precision_at_10']:.4f}" if s else "-"]
        print(f"| {n} | " + " | ".join(row) + " |")
    if any(cell("n2d", n) for n in names):
        print("\n| feature (70k images) | k-means ACC | k-means NMI | N2D ACC | N2D NMI | N2D ARI |\n|---|---|---|---|---|---|")
        for n in names:
            c, d = cell("clustering", n), cell("n2d", n)
            if d:
                km = [f"{c['accuracy']['mean']:.3f}", f"{c['nmi']['mean']:.3f}"] if c else ["-", "-"]
                print(f"| {n} | " + " | ".join(km + [ms(d[m]) for m in ("accuracy", "nmi", "ari")]) + " |")
    libs = cell("libraries", "encoder")
    if libs:
        print("\n| search of 10k queries in 60k encoder features (cosine) | build s | index MB | queries/s | recall@10 |\n|---|---|---|---|---|")
        for lib, r in libs.items():
            print(f"| {lib} | {r['build_s']:.2f} | {r['bytes'] / 2**20:.0f} | {r['qps']:.0f} | {r['recall']:.4f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default="runs/demo/tokenizer")
    p.add_argument("--out", default="runs/features-bench")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--features", default="pixels,pca50,encoder,encoder_pooled,encoder_pca50,quantized,codes,codes_pyramid")
    p.add_argument("--seeds", type=int, default=10, help="draws of the few-label protocol")
    p.add_argument("--cluster-seeds", type=int, default=10, help="k-means runs (the protocol: 10)")
    p.add_argument("--n-init", type=int, default=20, help="starts of each k-means run (the protocol: 20)")
    p.add_argument("--n2d-seeds", type=int, default=3, help="N2D runs (UMAP and the mixture seeded together)")
    p.add_argument("--probe-max-iter", type=int, default=300, help="lbfgs iterations of the linear probe's fits")
    args = p.parse_args()
    print(machine(), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    names = args.features.split(",")
    feats, ytr, yte = load_features(args.tokenizer, names)
    for protocol in args.protocols.split(","):
        for name in ["encoder"] if protocol == "libraries" else names:
            key = f"{protocol}/{name}"
            if key in results and not (protocol == "clustering" and results[key]["accuracy"]["runs"] < args.cluster_seeds):
                continue
            t = time.perf_counter()
            results[key] = run_cell(protocol, name, feats, ytr, yte, args) | {"seconds": time.perf_counter() - t, "machine": machine()}
            print(f"{key}: {json.dumps(results[key])[:400]}", flush=True)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
    print_tables(results)
    best = lambda p, get: max((get(v), k.split("/")[1]) for k, v in results.items() if k.startswith(p + "/") and k.split("/")[1] not in BASELINES)  # noqa: E731
    for p_, get, unit, target in (("clustering", lambda v: v["accuracy"]["mean"], "accuracy", 0.70), ("n2d", lambda v: v["accuracy"]["mean"], "accuracy", 0.70),
                                  ("n2d", lambda v: v["nmi"]["mean"], "NMI", 0.70), ("probe", lambda v: v["accuracy"], "accuracy", 0.90)):  # fmt: skip
        if any(k.startswith(p_ + "/") for k in results):
            value, name = best(p_, get)
            report(f"features {p_} ({name})", value, unit, target=f">= {target}", ok=value >= target)
    if "search/pixels" in results and any(k.startswith("search/") for k in results):
        value, name = best("search", lambda v: v["precision_at_10"])
        base = results["search/pixels"]["precision_at_10"]
        report(f"features precision@10 ({name})", value, "precision", "pixels", base, ratio=value - base, target=">= pixels + 0.05", ok=value - base >= 0.05)
    if "few/pixels" in results:
        value, name = best("few", lambda v: v["100"]["logistic"]["mean"])
        base = results["few/pixels"]["100"]["logistic"]["mean"]
        report(f"features 100/class logistic ({name})", value, "accuracy", "pixels", base, ratio=value - base, target=">= pixels + 0.05", ok=value - base >= 0.05)


if __name__ == "__main__":
    main()
