"""The docs cannot rot silently: every command in README.md and docs/*.md still takes the options written
there, every Python snippet's imports still work, and every link between the pages resolves.

Commands are checked against their own ``--help``, in this process (each entry point's ``main`` with
``--help``), so a renamed option, module or subcommand fails here rather than in a user's terminal.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import inspect
import io
import os
import re
import shlex
import sys
import unicodedata

import pytest

from conftest import ROOT

PAGES = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OPTION = re.compile(r"--[A-Za-z][\w-]*")
SUBCOMMANDS = {"codec": ("compress", "decompress"), "features": ("extract", "index", "search", "cluster")}


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _blocks(page: str) -> list[tuple[str, str]]:
    return FENCE.findall(open(page, encoding="utf-8").read())


def _commands(page: str) -> list[str]:
    """The shell commands of a page: every line of its bash blocks, and every ``$ `` line of any block,
    with continuations joined and trailing comments dropped."""
    found = []
    for lang, body in _blocks(page):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            elif lang not in ("bash", "sh"):
                continue
            line = re.sub(r"\s+#.*$", "", line)
            if line and not line.startswith("#"):
                found.append(line)
    return found


def _entry(tokens: list[str]) -> tuple[str, list[str]] | None:
    """('module' or 'make', its arguments) of a command line; None for commands vqgpt does not own."""
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "make":
        return "make", tokens[1:]
    if tokens[0] == "accelerate" and "-m" in tokens:
        i = tokens.index("-m")
        return tokens[i + 1], tokens[i + 2 :]
    if tokens[0] in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m":
        return tokens[2], tokens[3:]
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return tokens[1][:-3].replace("/", "."), tokens[2:]
    return None


def _help(module: str, sub: str | None) -> str | None:
    """The ``--help`` text of an entry point, or None where its main takes no options (a benchmark run)."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: python -m runs its __main__
        mod = importlib.import_module(module + ".__main__")
    main = mod.main
    source = inspect.getsource(mod)
    if "parse_args" not in source:
        return None
    argv = [sub, "--help"] if sub else ["--help"]
    out = io.StringIO()
    saved = sys.argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            if inspect.signature(main).parameters:
                main(argv)
            else:
                sys.argv = [module, *argv]
                main()
    finally:
        sys.argv = saved
    return out.getvalue()


def _normalise(option: str) -> str:
    return option.split("=")[0].replace("-", "_")


COMMANDS = sorted({(_rel(p), c) for p in PAGES for c in _commands(p) if _entry(shlex.split(c))})


def test_the_pages_have_commands():
    assert len(COMMANDS) > 30 and any(page == "README.md" for page, _ in COMMANDS)


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}: {c}"[:90] for p, c in COMMANDS])
def test_command_takes_its_options(page, command):
    module, args = _entry(shlex.split(command))
    if module == "make":
        targets = re.findall(r"^([\w-]+):", open(os.path.join(ROOT, "Makefile")).read(), re.M)
        assert all(a in targets or "=" in a for a in args), (command, targets)
        return
    sub = None
    if module in SUBCOMMANDS:
        assert args and args[0] in SUBCOMMANDS[module], f"{page}: {command}: expected a subcommand of {module}"
        sub = args[0]
    text = _help(module, sub)
    given = {_normalise(a) for a in args if OPTION.fullmatch(a.split("=")[0])}
    if text is None:
        assert not given, f"{page}: {command}: {module} takes no options"
        return
    known = {_normalise(o) for o in OPTION.findall(text)}
    assert given <= known, f"{page}: {command}: {sorted(given - known)} not among the options of {module} {sub or ''}"


SNIPPETS = [(_rel(p), body) for p in PAGES for lang, body in _blocks(p) if lang == "python"]


@pytest.mark.parametrize("page,snippet", SNIPPETS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(SNIPPETS)])
def test_snippet_imports(page, snippet):
    imports = [line.strip() for line in snippet.splitlines() if re.match(r"\s*(from \S+ import |import )", line)]
    assert imports, f"{page}: a Python snippet without imports"
    exec("\n".join(imports), {})  # noqa: S102 - the project's own docs


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page: str) -> set[str]:
    text = FENCE.sub("", open(page, encoding="utf-8").read())
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


LINKS = sorted({(_rel(p), target) for p in PAGES for target in LINK.findall(FENCE.sub("", open(p, encoding="utf-8").read()))
                if not re.match(r"^[a-z]+:", target)})  # fmt: skip


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p} -> {t}"[:90] for p, t in LINKS])
def test_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
    assert os.path.exists(full), f"{page}: link to {target}: no such file"
    if anchor:
        assert full.endswith(".md"), f"{page}: anchor into a file that is not a page: {target}"
        assert anchor in _anchors(full), f"{page}: link to {target}: no such heading in {_rel(full)}"


def test_readme_is_a_front_page():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 250, len(lines)
    results = re.search(r"^## Results\n(.*?)^## ", "\n".join(lines) + "\n## ", re.M | re.S).group(1)
    rows = [line for line in results.splitlines() if line.startswith("|")][2:]  # past the header and its rule
    assert 0 < len(rows) <= 10, len(rows)
