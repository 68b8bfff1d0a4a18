"""A throwaway PostgreSQL cluster on 127.0.0.1, for tests and local runs.

The server binaries are found with ``pg_config --bindir`` or in Debian's versioned
folder. When TimescaleDB is installed for that server, it is preloaded, so the same
cluster covers both database profiles wherever the extension exists.

A cluster never outlives the process that started it: beside the server runs a
guard, a small process of its own session that stops the server and removes its
folder once that process is gone, even by SIGKILL, which no handler of its own
sees. (PR_SET_PDEATHSIG cannot serve: the postmaster's parent is ``pg_ctl``,
which exits as soon as the server is up.) This file is the guard's program too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class LocalClusterError(RuntimeError):
    """The throwaway cluster could not be found, made or started."""


def find_bindir() -> Path:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` live."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True).stdout.strip()
            candidates.append(Path(out))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise LocalClusterError(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir` and "
        "/usr/lib/postgresql/*/bin); install the postgresql package"
    )


def _pg_config_value(bindir: Path, flag: str) -> Path | None:
    exe = bindir / "pg_config"
    if not exe.exists():
        exe_path = shutil.which("pg_config")
        if not exe_path:
            return None
        exe = Path(exe_path)
    try:
        out = subprocess.run([str(exe), flag], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out.stdout.strip())


def timescaledb_installed(bindir: Path) -> bool:
    """True when the TimescaleDB extension is installed for this server."""
    sharedir = _pg_config_value(bindir, "--sharedir")
    libdir = _pg_config_value(bindir, "--pkglibdir")
    if sharedir is None or libdir is None:
        return False
    return (sharedir / "extension" / "timescaledb.control").exists() and (libdir / "timescaledb.so").exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalCluster:
    """initdb into a temp dir, start on a free port, stop and remove on exit."""

    port: int = field(default_factory=free_port)
    preload_timescaledb: bool | None = None  # None: when installed
    timescaledb_background_workers: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # more postgresql.conf lines, as written there
    bindir: Path = field(default_factory=find_bindir)
    datadir: Path | None = None
    guard: bool = True  # stop the server when the starting process is gone
    _owner: str | None = None
    _tmp: Path | None = None
    _guard: subprocess.Popen[bytes] | None = None

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard is not None else None

    @property
    def has_timescaledb(self) -> bool:
        return bool(self.preload_timescaledb)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._owner:
            cmd = ["runuser", "-u", self._owner, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LocalClusterError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def start(self) -> LocalCluster:
        if self.preload_timescaledb is None:
            self.preload_timescaledb = timescaledb_installed(self.bindir)
        self._tmp = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.datadir = self._tmp / "data"
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the server as an ordinary account.
            self._owner = _unprivileged_account()
            uid = pwd.getpwnam(self._owner).pw_uid
            gid = pwd.getpwnam(self._owner).pw_gid
            os.chown(self._tmp, uid, gid)
        if self.guard:
            self._start_guard()
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        )  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self._tmp}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        if self.preload_timescaledb:
            settings["shared_preload_libraries"] = "'timescaledb'"
            settings["timescaledb.telemetry_level"] = "off"
            settings["timescaledb.max_background_workers"] = str(self.timescaledb_background_workers)
            # One worker per database with the extension, plus the launcher.
            settings["max_worker_processes"] = str(8 + self.timescaledb_background_workers)
        settings.update(self.settings)
        conf = self.datadir / "postgresql.auto.conf"
        with conf.open("a") as fh:
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.datadir),
            "-l", str(self._tmp / "server.log"),
            "-w", "-t", "60",
            "start",
        )  # fmt: skip
        return self

    def _start_guard(self) -> None:
        assert self._tmp is not None and self.datadir is not None
        # Its own session: a Ctrl-C or a signal to the starter's process group
        # leaves it be; it ends when the starter is gone or stop() ends it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "FAKETIME"))}
        self._guard = subprocess.Popen(
            [sys.executable, "-I", __file__, "guard", str(os.getpid()), str(self._tmp), str(self.datadir),
             str(self.bindir), self._owner or ""],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )  # fmt: skip

    def _end_guard(self) -> None:
        if self._guard is not None:
            # It holds nothing while its starter lives. (A wait with a timeout sleeps,
            # which libfaketime's clock refuses: the tests at faked dates stop clusters.)
            self._guard.kill()
            self._guard.wait()
            self._guard = None

    def stop(self, *, remove: bool = True) -> None:
        self._end_guard()
        if self.datadir is not None and self.datadir.exists():
            with contextlib.suppress(LocalClusterError):
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        if remove and self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start the same cluster (for fault tests)."""
        assert self.datadir is not None
        assert self._tmp is not None
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.datadir),
            "-l", str(self._tmp / "server.log"),
            "-m", "fast", "-w", "-t", "60",
            "restart",
        )  # fmt: skip

    def ensure_running(self) -> None:
        """Start the server again if a fault test left it stopped."""
        assert self.datadir is not None
        assert self._tmp is not None
        pg_ctl = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir)]
        status = subprocess.run(
            (["runuser", "-u", self._owner, "--"] if self._owner else []) + [*pg_ctl, "status"],
            capture_output=True,
            check=False,
        )
        if status.returncode != 0:
            self._run(*pg_ctl, "-l", str(self._tmp / "server.log"), "-w", "-t", "60", "start")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _guard(starter: int, tmp: Path, datadir: Path, bindir: Path, owner: str) -> None:
    """The guard's loop: wait for the starting process to be gone (this process is
    then re-parented), stop the server at once and remove its folder."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while os.getppid() == starter and tmp.exists():
        time.sleep(0.2)
    if not tmp.exists():
        return  # stopped and removed as usual
    if (datadir / "postmaster.pid").exists():
        cmd = [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", "stop"]
        if owner:
            cmd = ["runuser", "-u", owner, "--", *cmd]
        subprocess.run(cmd, capture_output=True, check=False)
    shutil.rmtree(tmp, ignore_errors=True)


def _unprivileged_account() -> str:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise LocalClusterError("running as root and no 'postgres' or 'nobody' account to run the server")


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    _pid, _tmp, _data, _bin, _owner = sys.argv[2:7]
    _guard(int(_pid), Path(_tmp), Path(_data), Path(_bin), _owner)
