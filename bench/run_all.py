"""Run every benchmark in bench/ and print one table: figure, peer or baseline, ratio, target.

    python -m bench.run_all          (make bench)   -- writes runs/bench/results.md too
"""

import datetime
import json
import os
import subprocess
import sys

import torch

from bench.common import machine

# Order matters: the quality run trains the models that the encode and sampling figures then use.
SCRIPTS = [
    ["bench.quantizer"],
    ["bench.tokenizer_step"],
    ["bench.prior_throughput"],
    ["bench.cpu_memory"],
    ["bench.quality"],
    ["bench.encode", "runs/bench/tokenizer"],
    ["bench.sampling", "runs/bench/prior"],
    ["bench.codec", "runs/bench/prior"],
    ["bench.anomaly", "--out", "runs/bench/anomaly", "--preset", "tiny", "--tokenizer-steps", "300", "--prior-steps", "300"],
]
if torch.cuda.is_available():  # the GPU section runs only where CUDA is present
    SCRIPTS += [["bench.gpu"], ["bench.fsdp"]]


def fmt(v):
    if v is None or v == "":
        return ""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main():
    rows = []
    for script in SCRIPTS:
        print(f"\n=== python -m {' '.join(script)}", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", *script], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("BENCH "):
                rows.append(json.loads(line[6:]))
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            sys.exit(f"{' '.join(script)} failed")
    lines = [
        f"Measured {datetime.date.today()} on {machine()} with `make bench`.",
        "",
        "| figure | value | peer / baseline | baseline value | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in
                          ("name", "value", "unit", "baseline", "baseline_value", "baseline_unit", "ratio", "target", "ok"))  # fmt: skip
        name = r["name"] + (f" ({extra})" if extra else "")
        met = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        unit = r["unit"]
        lines.append(f"| {name} | {fmt(r['value'])} {unit} | {r['baseline']} | "
                     f"{fmt(r['baseline_value']) + ' ' + r.get('baseline_unit', unit) if r['baseline_value'] is not None else ''} | "
                     f"{fmt(r['ratio'])} | {r['target']} | {met} |")  # fmt: skip
    table = "\n".join(lines)
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/results.md", "w") as f:
        f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
