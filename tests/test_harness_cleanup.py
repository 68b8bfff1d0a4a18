"""The session's throwaway cluster never outlives the pytest that started it:
SIGTERM ends the session as Ctrl-C does (the fixtures unwind and stop it), and
after a SIGKILL, which no handler sees, the cluster's guard stops it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_local.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]

# A session that holds its cluster until it is stopped; the harness (conftest)
# is loaded as a plugin so that the test can live outside the suite.
HOLD = """
import os, time
from pathlib import Path

def test_hold(pg_server):
    Path(os.environ["FLEET_HOLD_MARKER"]).write_text(str(pg_server.cluster.datadir))
    time.sleep(300)
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp folder the server's own account can enter (it runs as postgres under root)."""
    where = Path(tempfile.mkdtemp(prefix="fleet-harness-test-"))
    where.chmod(0o755)
    yield where
    _stop_left_clusters(where)
    shutil.rmtree(where, ignore_errors=True)


def _stop_left_clusters(where: Path) -> None:
    """A failing test leaves nothing running either."""
    for pidfile in where.glob("fleet-pg-*/data/postmaster.pid"):
        pid = int(pidfile.read_text().split()[0])
        if _is_postmaster_of(pid, pidfile.parent):
            os.kill(pid, signal.SIGQUIT)


def _is_postmaster_of(pid: int, datadir: Path) -> bool:
    try:
        return str(datadir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
    except OSError:
        return False


def _postgres_of(datadir: Path) -> list[int]:
    """The processes of the server whose data directory this is: the postmaster
    (its command line names the folder) and its children."""
    pids: list[int] = []
    postmaster = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_postmaster_of(int(p.name), datadir)
    ]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if int(proc.name) in postmaster or ppid in postmaster:
            pids.append(int(proc.name))
    return pids


def _held_session(scratch: Path) -> tuple[subprocess.Popen[bytes], Path]:
    test = scratch / "test_hold.py"
    test.write_text(HOLD)
    marker = scratch / "datadir"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(TMPDIR=str(scratch), FLEET_HOLD_MARKER=str(marker))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
         "-p", "conftest", "-p", "no:cacheprovider", "-q", str(test)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "the held session ended before its cluster was up"
        assert time.monotonic() < deadline, "the held session's cluster did not come up"
        time.sleep(0.2)
    datadir = Path(marker.read_text())
    assert _postgres_of(datadir), "no postgres found for the held session's cluster"
    return proc, datadir


def _gone_within(datadir: Path, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = _postgres_of(datadir)
        if not left and not datadir.parent.exists():
            return []
        time.sleep(0.2)
    return _postgres_of(datadir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_pytest_leaves_no_postgres_of_its_cluster(scratch: Path, sig: signal.Signals) -> None:
    proc, datadir = _held_session(scratch)
    try:
        proc.send_signal(sig)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert code == 2, f"pytest ended with {code}, not as interrupted (2)"  # what Ctrl-C gives
    assert _gone_within(datadir, 5.0) == [], f"postgres of {datadir} left after {sig.name}"
    assert not datadir.parent.exists(), "the cluster's folder is left"


def test_the_guard_stops_a_cluster_whose_starter_was_killed(scratch: Path) -> None:
    """The same guard for every user of the cluster code (the demo, ``fleet local``)."""
    code = (
        "import sys, time, tempfile; sys.path.insert(0, sys.argv[1]); tempfile.tempdir = sys.argv[2];"
        "from fleet_local.cluster import LocalCluster; c = LocalCluster(preload_timescaledb=False).start();"
        "print(c.datadir, flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(ROOT / "tools"), str(scratch)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        datadir = Path(proc.stdout.readline().strip())
        assert _postgres_of(datadir)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone_within(datadir, 5.0) == []
    assert not datadir.parent.exists()


def test_a_cluster_stopped_as_usual_ends_its_guard(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cluster = LocalCluster(preload_timescaledb=False).start()
    guard = cluster.guard_pid
    assert guard is not None and Path(f"/proc/{guard}").exists()
    cluster.stop()
    assert not Path(f"/proc/{guard}").exists() or "zombie" in Path(f"/proc/{guard}/status").read_text()
    assert list(scratch.glob("fleet-pg-*")) == []
