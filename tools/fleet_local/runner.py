"""The local runner: ``template.yaml``'s functions, HTTP API routes and schedules
on one host without Docker. Each function runs in worker processes of its own
(fleet_local.worker) with its template environment merged with an env-vars file,
as ``sam local`` would run it in a container.

The embedded defaults: a throwaway PostgreSQL cluster when ``DATABASE_URL`` is not
given, and a local DynamoDB endpoint (moto server) when none is configured.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleet_local.api import Route, serving
from fleet_local.template import FunctionSpec, Template, function_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "template.yaml"
# The customer and token of the sample events in events/ (and env.sample.json): a
# throwaway Admin database has them registered, so the samples work as they are.
SAMPLE_CUSTOMER = "DEV0001"
SAMPLE_TOKEN = "flt_ExampleTokenReplaceWithYourOwn_2RmiI6"  # noqa: S105 - public, throwaway databases only


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


# --- schedules ------------------------------------------------------------------

_RATE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_CRON = re.compile(r"^cron\((.+)\)$")
_MONTHS = {
    m: i for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1)
}
_DAYS = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"], 1)}


@dataclass(frozen=True)
class Schedule:
    """An EventBridge schedule expression: ``rate(...)`` or ``cron(...)`` (UTC)."""

    expression: str
    every: timedelta | None = None
    fields: tuple[frozenset[int], ...] | None = None  # minute, hour, day, month, weekday(1=SUN)

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        text = expression.strip()
        rate = _RATE.match(text)
        if rate:
            amount, unit = int(rate[1]), rate[2].rstrip("s")
            if amount < 1:
                raise ValueError(f"rate must be positive: {expression}")
            if (amount == 1) != (not rate[2].endswith("s")):
                raise ValueError(f"use '1 {unit}' or 'N {unit}s': {expression}")
            return cls(text, every=timedelta(**{f"{unit}s": amount}))
        cron = _CRON.match(text)
        if not cron:
            raise ValueError(f"not a schedule expression: {expression}")
        parts = cron[1].split()
        if len(parts) != 6:
            raise ValueError(f"cron needs 6 fields (min hour day-of-month month day-of-week year): {expression}")
        minute, hour, dom, month, dow, _year = parts
        if (dom == "?") == (dow == "?"):
            raise ValueError(f"exactly one of day-of-month and day-of-week must be '?': {expression}")
        fields = (
            _field(minute, 0, 59),
            _field(hour, 0, 23),
            _field(dom, 1, 31),
            _field(month, 1, 12, _MONTHS),
            _field(dow, 1, 7, _DAYS),
        )
        return cls(text, fields=fields)

    def next_after(self, when: datetime) -> datetime:
        if self.every is not None:
            return when + self.every
        assert self.fields is not None
        minute, hour, dom, month, dow = self.fields
        t = when.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60):
            weekday = (t.isoweekday() % 7) + 1  # SUN=1 .. SAT=7
            if t.minute in minute and t.hour in hour and t.month in month and t.day in dom and weekday in dow:
                return t
            t += timedelta(minutes=1)
        raise ValueError(f"{self.expression} never fires")


def _field(text: str, low: int, high: int, names: dict[str, int] | None = None) -> frozenset[int]:
    if text in ("*", "?"):
        return frozenset(range(low, high + 1))
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
            if step < 1:
                raise ValueError(f"bad step in {text}")
        if part in ("*", ""):
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            start, end = _value(a, names), _value(b, names)
        else:
            start = _value(part, names)
            end = high if "/" in text else start
        if not (low <= start <= high and low <= end <= high):
            raise ValueError(f"{text}: out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _value(text: str, names: dict[str, int] | None) -> int:
    key = text.upper()
    if names and key in names:
        return names[key]
    return int(text)


def scheduled_event(logical_id: str, event_name: str, when: datetime) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "local",
        "resources": [f"arn:aws:events:local:000000000000:rule/fleet-local-{logical_id}{event_name}"],
        "detail": {},
    }


def run_schedules(
    stack: LocalStack,
    stop: threading.Event,
    on_result: Callable[[str, Any], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    fire_at_start: bool = True,
    only: set[str] | None = None,
) -> None:
    """Invoke each scheduled function on its schedule until ``stop`` is set."""
    plans: list[_Plan] = []
    now = clock()
    for logical_id, event_name, expr in stack.schedules():
        if only is not None and logical_id not in only:
            continue
        schedule = Schedule.parse(expr)
        plans.append(_Plan(logical_id, event_name, schedule, now if fire_at_start else schedule.next_after(now)))
    while not stop.is_set() and plans:
        plan = min(plans, key=lambda p: p.due)
        wait = (plan.due - clock()).total_seconds()
        if wait > 0 and stop.wait(min(wait, 1.0)):
            break
        if wait > 0:
            continue
        try:
            result: Any = stack.invoke(plan.logical_id, scheduled_event(plan.logical_id, plan.event_name, plan.due))
        except InvokeError as exc:
            result = exc.payload
        if on_result:
            on_result(plan.logical_id, result)
        plan.due = plan.schedule.next_after(plan.due if plan.schedule.every is None else clock())


@dataclass
class _Plan:
    logical_id: str
    event_name: str
    schedule: Schedule
    due: datetime


# --- embedded defaults --------------------------------------------------------------


@contextmanager
def embedded_dynamodb() -> Iterator[str]:
    """A local DynamoDB endpoint (moto server) on 127.0.0.1; yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    from fleet_local.cluster import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per DynamoDB call

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def ensure_state_table(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "eu-west-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
    )
    with contextlib.suppress(client.exceptions.ResourceInUseException):
        client.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": "resource", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "resource", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )


@contextmanager
def embedded_database(role: str, existing_url: str | None = None, profile: str = "auto") -> Iterator[str]:
    """``DATABASE_URL`` when given; else a throwaway cluster with a database
    migrated in ``profile``, an Admin one with the sample customer registered."""
    from fleet import db
    from fleet.migrations import migrate
    from psycopg import sql

    from fleet_local.cluster import LocalCluster

    with ExitStack() as stack:
        url = existing_url
        if not url:
            cluster = LocalCluster(timescaledb_background_workers=4)
            stack.callback(cluster.stop)  # before start: a start cut short is cleaned up too
            cluster.start()
            with db.connect(cluster.url()) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"fleet_{role}")))
            url = cluster.url(f"fleet_{role}")
        with db.connect(url) as conn:
            migrate(conn, role, profile)  # type: ignore[arg-type]
            if role == "admin" and not existing_url:
                register_sample_customer(conn)
        yield url


def register_sample_customer(conn: Any) -> None:
    """The sample events' customer and token (only its SHA-256 is stored)."""
    from fleet import tokens

    with conn.transaction():
        conn.execute(
            "INSERT INTO fleet.customers (id, name) VALUES (%s, 'Sample events') ON CONFLICT (id) DO NOTHING",
            (SAMPLE_CUSTOMER,),
        )
        conn.execute(
            "INSERT INTO fleet.customer_tokens (token_sha256, customer_id, token_hint) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (tokens.digest(SAMPLE_TOKEN), SAMPLE_CUSTOMER, tokens.hint(SAMPLE_TOKEN)),
        )


def push_settings_missing(stack: LocalStack) -> str | None:
    """What the PushFunction still needs to be told, in words, or None."""
    env = stack.environment("PushFunction")
    missing = [] if env.get("INGEST_URL") else ["INGEST_URL"]
    if not env.get("INGEST_TOKEN") and not env.get("INGEST_TOKEN_SECRET_ARN"):
        missing.append("INGEST_TOKEN")
    if not missing:
        return None
    return (
        f"PushFunction: {' and '.join(missing)} not set, so every push tick fails. Set them under"
        ' "PushFunction" in an --env-vars file: env.sample.json sends to http://127.0.0.1:3000/api/fleet/ingest'
        " (where `fleet local start-api` serves the Admin API) with the sample customer's token"
    )


def local_aws_env() -> None:
    """Credentials for local endpoints, so boto3 never looks further."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")


def wait_forever(stop: threading.Event) -> None:
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        stop.set()
