"""The local runner: ``template.yaml``'s functions, HTTP API routes and schedules
on one host without Docker. Each function runs in worker processes of its own
(fleet_local.worker) with its template environment merged with an env-vars file,
as ``sam local`` would run it in a container. Its schedules are in
``fleet_local.schedules``; what it starts when not told where the servers are, in
``fleet_local.embedded``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_local.api import Route, serving
from fleet_local.template import FunctionSpec, Template, function_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "template.yaml"


class InvokeError(RuntimeError):
    """The function raised, failed to start, or timed out."""

    def __init__(self, message: str, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.payload = payload or {"errorMessage": message}


class Worker:
    """One warm execution environment for one function."""

    def __init__(self, spec: FunctionSpec, env: dict[str, str], layer_dirs: list[Path], log: Any = None) -> None:
        self.spec = spec
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in layer_dirs), str(spec.code_uri), full_env.get("PYTHONPATH", "")]
        )
        full_env["AWS_LAMBDA_FUNCTION_NAME"] = spec.logical_id
        full_env.setdefault("AWS_DEFAULT_REGION", "eu-west-1")
        full_env.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet_local.worker",
                str(spec.code_uri),
                spec.handler,
                spec.logical_id,
                str(spec.timeout_s),
                str(spec.memory_mb),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else None,
            env=full_env,
            text=True,
            bufsize=1,
        )
        first = self._read(60.0)
        if not first.get("ready"):
            self.close()
            raise InvokeError(first.get("error", "the function did not start"))

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        box: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: box.put(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            line = box.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise InvokeError(f"Task timed out after {timeout:.2f} seconds") from None
        if not line:
            raise InvokeError(f"the {self.spec.logical_id} process exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def invoke(self, event: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"event": event, "request_id": str(uuid.uuid4())}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(self.spec.timeout_s + 5.0)
        if not answer.get("ok"):
            raise InvokeError(
                answer.get("error", "error"),
                {
                    "errorMessage": answer.get("error"),
                    "errorType": answer.get("errorType"),
                    "stackTrace": answer.get("stackTrace"),
                },
            )
        return answer.get("result")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class FunctionPool:
    """Up to ``size`` concurrent execution environments for one function."""

    def __init__(
        self, spec: FunctionSpec, env: dict[str, str], layer_dirs: list[Path], size: int = 4, log: Any = None
    ) -> None:
        self.spec = spec
        self.env = env
        self.layer_dirs = layer_dirs
        self.size = size
        self.log = log
        self._idle: queue.LifoQueue[Worker] = queue.LifoQueue()
        self._count = 0
        self._lock = threading.Lock()
        self._all: list[Worker] = []

    def _take(self) -> Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._count < self.size:
                self._count += 1
                worker = Worker(self.spec, self.env, self.layer_dirs, self.log)
                self._all.append(worker)
                return worker
        return self._idle.get()

    def invoke(self, event: Any, context: Any = None) -> Any:
        worker = self._take()
        try:
            return worker.invoke(event)
        finally:
            if worker.alive:
                self._idle.put(worker)
            else:
                with self._lock:
                    self._count -= 1

    def close(self) -> None:
        for worker in self._all:
            worker.close()


@dataclass
class LocalStack:
    """The template's functions, ready to invoke, serve and schedule."""

    template: Template
    env_vars: dict[str, dict[str, str]] = field(default_factory=dict)
    concurrency: int = 4
    log: Any = None
    _pools: dict[str, FunctionPool] = field(default_factory=dict)

    @property
    def functions(self) -> dict[str, FunctionSpec]:
        return self.template.functions()

    def environment(self, logical_id: str) -> dict[str, str]:
        return function_environment(self.functions[logical_id], self.env_vars)

    def spec(self, logical_id: str) -> FunctionSpec:
        """The function, or a KeyError saying why the stack has none of that name."""
        specs = self.functions
        if logical_id not in specs:
            raise KeyError(self._not_created(logical_id))
        return specs[logical_id]

    def pool(self, logical_id: str) -> FunctionPool:
        if logical_id not in self._pools:
            self._pools[logical_id] = FunctionPool(
                self.spec(logical_id),
                self.environment(logical_id),
                self.template.layer_dirs(),
                self.concurrency,
                self.log,
            )
        return self._pools[logical_id]

    def _not_created(self, logical_id: str) -> str:
        every = self.template.all_functions()
        spec = every.get(logical_id)
        if spec is None or spec.condition is None:
            return f"no function {logical_id!r} in {self.template.path.name}: {', '.join(every)}"
        params = self.template.parameters
        given = " ".join(f"{k}={params[k]!r}" for k in self.template.condition_parameters(spec.condition))
        return (
            f"{logical_id} is not created with these parameters: its Condition {spec.condition} is false"
            f" ({given}); set them with --parameter-overrides, as sam does"
        )

    def invoke(self, logical_id: str, event: Any) -> Any:
        return self.pool(logical_id).invoke(event)

    def routes(self) -> list[Route]:
        routes = []
        for logical_id, spec in self.functions.items():
            for method, path in spec.routes:
                pool = self.pool(logical_id)
                routes.append(Route(method, path, pool.invoke, logical_id, spec.timeout_s))
        return routes

    def schedules(self) -> list[tuple[str, str, str]]:
        """(logical id, event name, expression) for every scheduled function."""
        return [(lid, name, expr) for lid, spec in self.functions.items() for name, expr in spec.schedules]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def serve_api(stack: LocalStack, host: str = "127.0.0.1", port: int = 3000) -> Any:
    """Every HTTP API route of the template, served until the block ends."""
    return serving(stack.routes(), host, port)
