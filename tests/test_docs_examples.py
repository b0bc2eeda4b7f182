"""Every ```python block in README.md and docs/*.md runs, so the documentation cannot drift from the code.

Rules for writers of docs pages (checked here):
- A ```python block is run as is, in a fresh namespace, with a temporary directory as the working
  directory (examples may write files), after ``torch.manual_seed(0)``. It should assert what it shows.
- It must take well under 2 s on 2 cores (blocks over ``SLOW_BLOCK_SECONDS`` fail).
- Markers are HTML comments on the lines right before the fence (blank lines between are allowed):
  - ``<!-- not-run: reason -->`` skips the block; the reason is required (a bare ``not-run`` fails).
  - ``<!-- run-as-script -->`` runs the block as ``python example.py`` in a subprocess instead of in this
    process (for code that needs a real ``__main__`` module, e.g. ``torch.multiprocessing.spawn``).
  - ``<!-- requires: transformers, peft -->`` skips the block when an optional dependency is missing
    (the test extra installs them all, so CI runs it).
- Blocks of other languages (```bash, ```text...) are not run.
Failures name the file, the block's index in it and its first line number.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import kbit

ROOT = Path(__file__).resolve().parent.parent

#: A block slower than this fails: examples are meant to take well under 2 s; the margin absorbs a
#: loaded, shared machine (CI runners and the development box have 2 cores).
SLOW_BLOCK_SECONDS = 30.0
#: Wall-clock limit of a ``run-as-script`` block.
SCRIPT_TIMEOUT_SECONDS = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^[ \t]*<!--\s*(?P<body>.*?)\s*-->[ \t]*$")
_KNOWN_MARKERS = ("not-run", "run-as-script", "requires")


@dataclass
class Block:
    path: Path
    index: int           # 0-based index among the file's python blocks
    line: int            # 1-based line number of the opening fence
    code: str
    markers: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)} python block {self.index} (line {self.line})"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    docs = ROOT / "docs"
    if docs.is_dir():
        files += sorted(docs.rglob("*.md"))
    return [f for f in files if f.is_file()]


def _markers_before(lines: list[str], fence: int) -> dict:
    """The marker comments on the lines just before line index ``fence`` (blank lines may separate them)."""
    markers: dict = {}
    i = fence - 1
    while i >= 0:
        text = lines[i]
        if not text.strip():
            i -= 1
            continue
        m = _MARKER.match(text)
        if not m:
            break
        body = m.group("body")
        name, sep, value = body.partition(":")
        name = name.strip()
        if name in _KNOWN_MARKERS:
            markers[name] = value.strip() if sep else None
        i -= 1
    return markers


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file (fences may be indented, e.g. inside a list)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang, start = m.group("ticks"), m.group("lang").lower(), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{ticks}`*[ \t]*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}: the code fence opened at line {start + 1} is never closed")
        i += 1  # past the closing fence
        if lang in ("python", "py", "python3"):
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(path, len(blocks), start + 1, code, _markers_before(lines, start)))
    return blocks


def _all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in python_blocks(path)]


BLOCKS = _all_blocks()


def test_docs_have_examples():
    assert any(b.path.name == "README.md" for b in BLOCKS), "README.md should show runnable Python examples"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary working directory and the process-wide settings an example might change, restored."""
    monkeypatch.chdir(tmp_path)
    dtype, threads, level = torch.get_default_dtype(), torch.get_num_threads(), kbit.get_cpu_capability()
    torch.manual_seed(0)
    # Examples are small: one thread runs them as fast as two, and is not slowed 10-20x by OpenMP's
    # spinning when the machine is shared (measured here: a 20-step MLP example, 0.26 s vs 5.4 s at load 7).
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    kbit.set_cpu_capability(level)
    kbit.optim.GlobalOptimManager.get_instance().initialize()


def _failing_line(block: Block, exc: BaseException) -> str:
    """' at line N: <source>' for the innermost frame of the example itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(block.path)]
    if not frames:
        return ""
    n = frames[-1].lineno
    source = block.code.splitlines()[n - block.line - 1].strip() if 0 < n - block.line <= len(block.code.splitlines()) else ""
    return f" at line {n}: {source}"


def _run_script(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: did not finish within {SCRIPT_TIMEOUT_SECONDS} s (run as a script)")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        pytest.fail(f"{block.where} failed (run as a script, exit {proc.returncode}):\n{tail}")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.path.relative_to(ROOT)}#{b.index}" for b in BLOCKS])
def test_python_example_runs(block: Block, isolated):
    if "not-run" in block.markers:
        reason = block.markers["not-run"]
        assert reason, f"{block.where}: a <!-- not-run: reason --> marker must give its reason"
        pytest.skip(f"{block.where}: not run ({reason})")
    if "requires" in block.markers:
        names = [n.strip() for n in (block.markers["requires"] or "").split(",") if n.strip()]
        assert names, f"{block.where}: <!-- requires: ... --> must name the packages"
        missing = [n for n in names if importlib.util.find_spec(n) is None]
        if missing:
            pytest.skip(f"{block.where}: needs {', '.join(missing)} (pip install the matching kbit extra)")
    t0 = time.perf_counter()
    if "run-as-script" in block.markers:
        _run_script(block, isolated)
    else:
        # Line numbers in tracebacks are those of the Markdown file.
        code = "\n" * block.line + block.code
        try:
            exec(compile(code, str(block.path), "exec"), {"__name__": "__doc_example__"})
        except Exception as exc:
            raise AssertionError(f"{block.where} failed{_failing_line(block, exc)}: {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - t0
    assert elapsed < SLOW_BLOCK_SECONDS, (
        f"{block.where} took {elapsed:.1f} s; examples should take well under 2 s (use smaller sizes)")


def test_markers_are_well_formed():
    """A misspelt marker (``<!-- not run -->``, ``<!-- notrun: ... -->``) would silently run or skip nothing."""
    problems = []
    for path in doc_files():
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = _MARKER.match(text)
            if not m:
                continue
            name = m.group("body").partition(":")[0].strip().lower()
            if name not in _KNOWN_MARKERS and re.sub(r"[^a-z]", "", name) in {"notrun", "runasscript", "requires",
                                                                              "skip", "norun"}:
                problems.append(f"{path.relative_to(ROOT)}:{n}: unknown marker {text.strip()!r}; "
                                f"use one of {', '.join(_KNOWN_MARKERS)}")
    assert not problems, "\n".join(problems)


def test_the_runner_finds_blocks_and_markers(tmp_path, monkeypatch):
    """The parser itself: indented fences, markers separated by a blank line, other languages ignored."""
    md = tmp_path / "page.md"
    md.write_text(textwrap.dedent("""\
        text
        ```python
        x = 1
        ```
        <!-- not-run: needs a GPU -->

        ```python
        y = 2
        ```
        ```bash
        echo no
        ```
        - a list item:
          ```python
          z = 3
          ```
    """))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = python_blocks(md)
    assert [b.code for b in blocks] == ["x = 1\n", "y = 2\n", "z = 3\n"]
    assert [b.line for b in blocks] == [2, 7, 14]
    assert blocks[0].markers == {} and blocks[1].markers == {"not-run": "needs a GPU"}


_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", text, flags=re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return slugs


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md points to a file that exists, and to a heading of
    that file when it names an anchor (Markdown targets only)."""
    broken = []
    for path in doc_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # not inside code
        for m in _LINK.finditer(text):
            target, _, anchor = m.group("target").partition("#")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # a URL
                continue
            file = (path.parent / target) if target else path
            if not file.exists():
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)} (no heading #{anchor} in {target or 'this page'})")
    assert not broken, "broken links:\n" + "\n".join(broken)
