"""Command lines of every vqgpt tool: dataclass arguments, their domains, and one-line errors.

Every entry point declares its options as dataclass fields. A field's ``metadata["domain"]`` says which
values it takes (see :data:`DOMAINS`); :func:`parse_args` checks every option against its domain before
any work starts, so ``--max-train-steps 0`` fails at once with one line naming the option, the value and
what was expected. :func:`run_main` turns user errors into that one line on stderr and exit status 1.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import sys
from collections.abc import Callable

from transformers import HfArgumentParser


class UserError(ValueError):
    """Bad input from the user; the message is one line naming the value and what was expected."""


class UsageError(UserError):
    """An option the command line cannot take (unknown, wrong type, outside its domain): exit status 2."""


# domain name -> (test, what the error says is expected)
DOMAINS: dict[str, tuple[Callable[[object], bool], str]] = {
    "positive": (lambda v: v > 0, "a positive number"),
    "non-negative": (lambda v: v >= 0, "a number >= 0"),
    "probability": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "fraction": (lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    "top-p": (lambda v: 0 < v <= 1, "a value in (0, 1]"),
    "dir": (lambda v: os.path.isdir(v), "an existing folder"),
    "file": (lambda v: os.path.isfile(v), "an existing file"),
}


def option(default=dataclasses.MISSING, help: str = "", domain: str | None = None, choices: list | None = None,  # noqa: A002
           aliases: list[str] | None = None, **kw):  # fmt: skip
    """A dataclass field with its help text and the values it accepts (a :data:`DOMAINS` name or ``choices``);
    ``aliases``: other spellings of the option (``["-k"]``)."""
    metadata = {"help": help}
    if aliases:
        metadata["aliases"] = aliases
    if domain is not None:
        assert domain in DOMAINS, domain
        metadata["domain"] = domain
    if choices is not None:
        metadata["choices"] = list(choices)
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line, and whose fields may carry a ``domain``."""

    def add_argument(self, *args, **kwargs):
        kwargs.pop("domain", None)  # ours, checked by check_domains; argparse does not know it
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message)


def check_domains(*parsed) -> None:
    """Raise a one-line :class:`UserError` for the first option outside its declared domain."""
    for obj in parsed:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            name = (f.metadata.get("aliases") or [flag(f.name)])[0]  # as the user most likely spelled it
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise UsageError(f"{name} {value!r}: expected one of {', '.join(map(str, choices))}")
            domain = f.metadata.get("domain")
            if domain is not None:
                test, expected = DOMAINS[domain]
                if not test(value):
                    raise UsageError(f"{name} {value!r}: expected {expected}")


def parse_args(types: tuple[type, ...], argv: list[str] | None = None, prog: str | None = None, **defaults) -> tuple:
    """Dataclasses from ``argv`` or from a single ``.json``/``.yaml`` file argument, domains checked.

    ``prog`` names the command in ``--help`` (a subcommand's full name); ``defaults`` override the
    dataclasses' defaults for one entry point (e.g. the prior's schedule).
    """
    parser = ArgumentParser(types, prog=prog)
    parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(argv[0])
    else:
        parsed = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if parsed[-1]:
            raise UsageError(f"unrecognized arguments: {' '.join(parsed[-1])}")
        parsed = parsed[:-1]
    check_domains(*parsed)
    for obj in parsed:  # cross-option checks that a single field's domain cannot express
        if hasattr(obj, "validate"):
            obj.validate()
    return parsed


def announce_memory(what: str, nbytes: float) -> None:
    """One line before a step whose memory grows with the data (an index, a reference set): the estimate
    against the memory the machine has free, so a run the kernel would kill says so before it starts."""
    import psutil

    free = psutil.virtual_memory().available
    line = f"{what}: about {nbytes / 2**30:.2f} GiB in memory ({free / 2**30:.1f} GiB available)"
    print(f"warning: {line}; this may not fit" if nbytes > 0.8 * free else line, file=sys.stderr if nbytes > 0.8 * free else sys.stdout)


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory this process frees, as PyTorch's GPU caching allocator does.

    glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
    free, so a CPU training step whose tensors are larger (the prior's logits and MLP activations, a
    tokenizer's feature maps) faults in and zeroes every 4 KiB page of them again at every step: at 196
    codes that kernel work was half of a prior step's time (bench/cpu_memory.py). With mmap off and trimming
    off, freed blocks are reused; the process keeps the memory of its peak, which it needs each step anyway.
    A no-op where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)  # never trim (mallopt(3))


def run_main(main) -> None:
    """Run an entry point; user errors become one line on stderr and exit status 1 (2 for usage errors).

    ``VQGPT_DEBUG=1`` lets them raise with their traceback instead, for bug reports.
    Every command runs with :func:`keep_freed_memory`.
    """
    from transformers.utils import logging as hf_logging

    keep_freed_memory()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: a command's stderr is its own messages and errors
    try:
        main()
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
