"""The README tells the truth: every ``sh`` block it presents as runnable runs as
written on a fresh clone after ``make demo``, with the embedded defaults (no
DATABASE_URL), and its layout table matches the tree.

A block that needs what a fresh clone on one host cannot have (AWS, Docker, a
server of your own) carries ``<!-- skip in the README test: why -->`` on the line
above it, and is skipped by name with that reason. Every other fence is ``text``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARK = re.compile(r"^<!--\s*skip in the README test:\s*(.+?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")
HTTP_ERROR = re.compile(r'"statusCode":\s*[45]\d\d')


@dataclass(frozen=True)
class Block:
    name: str  # the section's heading and the block's number in it
    line: int
    lang: str
    code: str
    skip: str | None  # why the README test does not run it


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    per_section: Counter[str] = Counter()
    heading, mark, i = "(top)", None, 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("#"):
            heading, mark = line.lstrip("#").strip(), None
        elif SKIP_MARK.match(line):
            mark = SKIP_MARK.match(line)[1]  # type: ignore[index]
        elif fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            per_section[heading] += 1
            name = f"{heading} #{per_section[heading]}"
            blocks.append(Block(name, start, fence[1], "\n".join(body) + "\n", mark))
            mark = None
        elif line.strip():
            mark = None  # a mark belongs to the block right below it
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.lang == "sh"]


def test_every_block_is_shell_text_or_json_and_every_mark_sits_on_a_shell_block() -> None:
    assert RUNNABLE, "the README has no shell blocks"
    assert {b.lang for b in BLOCKS} <= {"sh", "text", "json"}, [(b.name, b.lang) for b in BLOCKS]
    for block in BLOCKS:
        if block.lang == "json":  # an example file: it must at least be what it claims
            json.loads(block.code)
    marks = sum(1 for line in README.read_text().splitlines() if SKIP_MARK.match(line))
    assert marks == sum(1 for b in RUNNABLE if b.skip), "a skip mark is not right above a ```sh block"


def test_the_layout_table_matches_the_tree() -> None:
    text = README.read_text()
    table = text[text.index("## Layout") :].split("\n\n")[1]
    paths = [re.match(r"\| `([^`]+)`", row)[1] for row in table.splitlines()[2:]]  # type: ignore[index]
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the layout table names paths that do not exist: {missing}"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    if not tracked:
        pytest.skip("not a git checkout: the tree's folders are unknown")
    folders = {f.split("/")[0] for f in tracked.splitlines() if "/" in f and not f.startswith(".")}
    listed = {p.rstrip("/").split("/")[0] for p in paths}
    assert folders <= listed, f"folders missing from the layout table: {sorted(folders - listed)}"
    assert {"layers/fleet/", "tools/fleet_local/"} <= set(paths)


def test_the_module_table_names_every_module_and_only_modules_that_exist() -> None:
    text = README.read_text()
    table = text[text.index("### Inside the runtime package and the local tool") :].split("\n\n")[2]
    named: set[str] = set()
    for row in table.splitlines()[2:]:
        first = re.match(r"\| `([^`]+)`", row)[1]  # type: ignore[index]
        folder = first.rsplit("/", 1)[0]
        named.add(first)
        named |= {f"{folder}/{m}" for m in re.findall(r"`([a-z_]+\.py)`", row.split("|")[2])}
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"the module table names modules that do not exist: {missing}"
    modules = {
        str(p.relative_to(ROOT))
        for base in ("layers/fleet/fleet", "tools/fleet_local")
        for p in (ROOT / base).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts and "sql" not in p.parts
    }
    assert modules - named == set(), f"modules missing from the README's module table: {sorted(modules - named)}"


def _copy_of_the_tree(dest: Path) -> None:
    """What a fresh clone of this working tree holds: the files git tracks (with
    their uncommitted changes) and new files it does not ignore; nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout: no fresh clone to make")
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


@dataclass
class Clone:
    path: Path
    env: dict[str, str]
    tmp: Path  # where the commands' throwaway clusters are made


@pytest.fixture(scope="module")
def fresh_clone() -> Iterator[Clone]:
    where = Path(tempfile.mkdtemp(prefix="fleet-readme-"))
    where.chmod(0o755)  # the throwaway clusters' server runs as postgres under root
    try:
        clone = where / "fleet-pipeline"
        clone.mkdir()
        _copy_of_the_tree(clone)
        tmp = where / "tmp"
        tmp.mkdir(mode=0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "VIRTUAL_ENV", "PYTHON"))}
        env.update(TMPDIR=str(tmp), PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        demo = subprocess.run(
            ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500, check=False
        )
        assert demo.returncode == 0, f"make demo failed on a fresh clone:\n{demo.stdout[-4000:]}\n{demo.stderr[-4000:]}"
        assert "all checks passed" in demo.stdout, demo.stdout[-4000:]
        yield Clone(clone, env, tmp)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_the_readme_block_runs_as_written(block: Block, request: pytest.FixtureRequest) -> None:
    if block.skip:
        pytest.skip(f"README block {block.name!r} (line {block.line}) not run: {block.skip}")
    clone: Clone = request.getfixturevalue("fresh_clone")
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=clone.path,
        env=clone.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    shown = f"README block {block.name!r} (line {block.line}):\n{block.code}\n--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-6000:]}"
    assert run.returncode == 0, shown
    assert not HTTP_ERROR.search(run.stdout), shown
    assert '"errorMessage"' not in run.stdout, shown
    left = sorted(p.name for p in clone.tmp.glob("fleet-pg-*"))
    assert not left, f"throwaway PostgreSQL clusters left behind: {left}\n{shown}"
