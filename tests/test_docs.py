"""The user's documents: README.md and docs/*.md.

* Every ```python block runs, as a user would paste it, in a fresh interpreter (slow lane). Conventions, as
  HTML comments on the line right before the block:

  - ``<!-- skip: REASON -->``: not run; reported as skipped with REASON (e.g. "needs the official weights",
    "needs a GPU");
  - ``<!-- cwd: repo -->``: run from the repository root (the block uses repository files such as
    ``benchmarks/``); every other block runs in an empty temporary folder, so what it reads it must make
    or take from the installed package.

  Blocks that import hloc skip where hloc cannot be found, as the hloc tests do (tests/conftest.py).
  Each block gets ``BLOCK_TIMEOUT_S`` seconds. The test ids name the file and the block's index in it.
* Every relative link and every repository path written in backticks exists (fast lane).
* The README keeps exactly two set-up commands (indented ``$`` lines), one of them the test command that
  ``.ci/run`` extracts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 600
# Top-level names a backticked repository path starts with (the layout pyproject.toml and the README describe).
REPO_ROOTS = ("romav2_plugin/", "kernels/", "adapters/", "tests/", "benchmarks/", "docs/", ".ci/")

_MARKER = re.compile(r"^<!--\s*(skip|cwd)\s*:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    doc: Path
    index: int  # among the doc's python blocks, from 0
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None
    cwd_repo: bool

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO).as_posix()}-block{self.index}-line{self.line}"


def python_blocks(doc: Path) -> list[Block]:
    """The ```python blocks of ``doc`` with their markers (the comment lines right before the fence)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"{doc}:{start + 1}: unclosed ```python block")
            skip, cwd_repo = None, False
            k = start - 1
            while k >= 0 and (m := _MARKER.match(lines[k].strip())):
                if m.group(1) == "skip":
                    skip = m.group(2)
                elif m.group(2) == "repo":
                    cwd_repo = True
                else:
                    raise ValueError(f"{doc}:{k + 1}: unknown cwd {m.group(2)!r} (only 'repo')")
                k -= 1
            blocks.append(Block(doc, len(blocks), start + 1, "\n".join(lines[start + 1 : j]) + "\n", skip, cwd_repo))
            i = j
        i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in python_blocks(doc)]


def run_block(block: Block, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    # This checkout's package first, as pytest itself imports it (pyproject's pythonpath); conftest.py has
    # already put ../shared/thirdparty/hloc on PYTHONPATH where no hloc is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    work = REPO if block.cwd_repo else tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    if re.search(r"^\s*(from|import) hloc\b", block.code, flags=re.M) and importlib.util.find_spec("hloc") is None:
        pytest.skip("hloc is not installed (nor in ../shared/thirdparty/hloc, see tests/conftest.py)")
    r = run_block(block, tmp_path)
    assert r.returncode == 0, (
        f"{block.id} exited {r.returncode}\n--- code ---\n{block.code}--- stdout ---\n{r.stdout[-4000:]}"
        f"\n--- stderr ---\n{r.stderr[-4000:]}"
    )


def test_docs_have_python_blocks() -> None:
    """The parser finds the blocks (a test that collects nothing would pass silently)."""
    assert DOCS[0].name == "README.md" and len(DOCS) > 1, DOCS
    assert len(python_blocks(REPO / "README.md")) >= 3, "README.md: quick start, kornia and hloc blocks"


def test_block_runner_reports_a_failing_block(tmp_path: Path) -> None:
    """A block that raises fails its run (the check above can fail), with the traceback in stderr."""
    doc = tmp_path / "broken.md"
    doc.write_text("text\n<!-- skip: reason -->\n```python\nprint(1)\n```\n\n```python\nimport romav2_plugin\n"
                   "raise SystemExit(romav2_plugin.no_such_name)\n```\n", encoding="utf-8")
    skipped, broken = python_blocks(doc)
    assert skipped.skip == "reason" and broken.skip is None and not broken.cwd_repo
    r = run_block(broken, tmp_path)
    assert r.returncode != 0 and "no_such_name" in r.stderr


# ----------------------------------------------------------------------------------------------- links
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HTML_SRC = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
_TICKS = re.compile(r"`([^`\s]+)`")


def _strip_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def referenced_paths(doc: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for every relative link and every backticked repository path of ``doc``."""
    text = _strip_code_blocks(doc.read_text(encoding="utf-8"))
    found: list[tuple[str, Path]] = []
    for target in [*_LINK.findall(text), *_HTML_SRC.findall(text)]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs, mailto:, anchors in the same page
        found.append((target, (doc.parent / target.split("#", 1)[0]).resolve()))
    for token in _TICKS.findall(text):
        path = token.split("::", 1)[0].rstrip(".,;:")
        if not path.startswith(REPO_ROOTS) or any(c in path for c in "*<>{}[]|$"):
            continue
        found.append((token, REPO / path))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_links_and_paths_exist(doc: Path) -> None:
    missing = [written for written, path in referenced_paths(doc) if not path.exists()]
    assert not missing, f"{doc.relative_to(REPO)}: missing {missing}"


def test_link_check_finds_a_missing_file(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text("[ok](page.md) [gone](nothing_here.md) `benchmarks/no_such_file.py` "
                   "[web](https://example.org/x) `not/a/repo/path`\n", encoding="utf-8")
    missing = [w for w, p in referenced_paths(doc) if not p.exists()]
    assert missing == ["nothing_here.md", "benchmarks/no_such_file.py"]


def test_readme_setup_commands() -> None:
    """Two set-up commands; .ci/run runs the first one holding ``python -m pytest`` (its sed/grep, in Python)."""
    commands = [line[6:] for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("    $ ")]
    assert len(commands) == 2, commands
    assert "romav2-match --demo" in commands[0]
    test_command = [c for c in commands if "python -m pytest" in c][0]
    assert test_command.startswith('pip install -e ".[dev]"') and "-m slow" not in test_command
