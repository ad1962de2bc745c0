"""Run many command lines of vqgpt's entry points, each as ``python -m MODULE ARGS`` would, quickly.

    python tests/scripts/cli_rows.py ROWS.json RESULTS.json

ROWS.json: a list of {"argv": ["module or script.py", args...], "env": {...}}. The heavy libraries are
imported once here; each row then runs in a forked child (``runpy`` with ``run_name="__main__"``, the
same path as ``python -m``), with its own stdout, stderr and exit status. RESULTS.json: a list of
{"rc", "stdout", "stderr"}. Nothing has run a parallel torch kernel before the forks.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback

PRELOAD = ["torch", "transformers", "accelerate", "datasets", "common.data", "common.hub", "tokenizer", "prior",
           "sample.pipeline", "evaluation", "codec", "anomaly", "features", "train.loop"]  # fmt: skip


def run_row(argv: list[str], env: dict, out_path: str, err_path: str) -> int:
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        out, err = os.open(out_path, os.O_WRONLY | os.O_CREAT), os.open(err_path, os.O_WRONLY | os.O_CREAT)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.update(env)
        target, sys.argv = argv[0], list(argv)
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                sys.modules.pop(target, None)
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main():
    rows = json.load(open(sys.argv[1]))
    for name in PRELOAD:
        importlib.import_module(name)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            rc = run_row(row["argv"], row.get("env", {}), out, err)
            results.append({"rc": rc, "stdout": open(out).read(), "stderr": open(err).read()})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
