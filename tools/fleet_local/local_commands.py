"""``fleet local …``, ``fleet demo`` and ``fleet status`` (developer and operator
commands that the Lambda functions themselves never import)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet_local.cli import DONE, NOT_DONE, NOT_RIGHT, NotDone


def register(sub: Any) -> None:
    local = sub.add_parser("local", help="run template.yaml's functions without Docker")
    lsub = local.add_subparsers(dest="local_command", required=True)

    inv = lsub.add_parser("invoke", help="like sam local invoke")
    inv.add_argument("logical_id")
    inv.add_argument("--event", "-e", type=Path, help="event file (default: an empty object)")
    _common(inv)
    inv.set_defaults(func=_ends_cleanly(_cmd_invoke))

    api = lsub.add_parser("start-api", help="like sam local start-api")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", "-p", type=int, default=3000)
    _common(api)
    api.set_defaults(func=_ends_cleanly(_cmd_start_api, stopped=0))

    sched = lsub.add_parser("schedule", help="invoke each scheduled function on its schedule")
    sched.add_argument("--ticks", type=int, default=0, help="stop after this many invocations (0: until Ctrl-C)")
    _common(sched)
    sched.set_defaults(func=_ends_cleanly(_cmd_schedule, stopped=0))

    demo = sub.add_parser("demo", help="end-to-end demo on one host (what `make demo` runs)")
    demo.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="a server to create the demo databases on (default: a throwaway cluster)",
    )
    demo.set_defaults(func=_ends_cleanly(_cmd_demo))

    status = sub.add_parser("status", help="fleet overview from the Admin database")
    status.add_argument("--database-url", default=argparse.SUPPRESS)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _ends_cleanly(
    command: Callable[[argparse.Namespace], int], stopped: int = 130
) -> Callable[[argparse.Namespace], int]:
    """SIGTERM and SIGHUP end a command as Ctrl-C does: the blocks that started
    throwaway servers (PostgreSQL, DynamoDB, workers) unwind and stop them. A
    second signal is ignored, so it cannot cut that clean-up short. ``stopped``
    is the exit status then (0 for the commands that run until stopped)."""

    def interrupt(signum: int, _frame: object) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def run(args: argparse.Namespace) -> int:
        if threading.current_thread() is not threading.main_thread():
            return command(args)  # signals reach the main thread only
        previous = {sig: signal.signal(sig, interrupt) for sig in _STOP_SIGNALS}
        try:
            return command(args)
        except KeyboardInterrupt as exc:
            print(f"stopped by {exc.args[0] if exc.args else 'SIGINT'}", file=sys.stderr)
            return stopped
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", "-t", type=Path, default=None, help="template file (default: template.yaml)")
    p.add_argument("--env-vars", "-n", type=Path, help="JSON file with environment overrides (SAM's format)")
    p.add_argument(
        "--parameter-overrides", nargs="*", default=[], metavar="KEY=VALUE", help="template parameters, as SAM"
    )


def _stack(args: argparse.Namespace, role_hint: str | None = None) -> Any:
    from fleet_local.runner import DEFAULT_TEMPLATE, LocalStack
    from fleet_local.template import Template, read_env_vars_file

    overrides = dict(item.split("=", 1) for item in args.parameter_overrides)
    if role_hint and "Mode" not in overrides:
        overrides["Mode"] = role_hint
    template = Template(args.template or DEFAULT_TEMPLATE, overrides)
    try:
        env_vars = read_env_vars_file(args.env_vars)
    except (OSError, ValueError) as exc:
        raise NotDone(f"the env-vars file cannot be read: {exc}") from None
    return LocalStack(template, env_vars)


def _open_stack(args: argparse.Namespace, exit_stack: ExitStack, role_hint: str | None = None) -> Any:
    """The template's stack, closed (its workers stopped) when ``exit_stack`` ends."""
    from fleet_local.embedded import local_aws_env

    local_aws_env()
    stack = _stack(args, role_hint)
    exit_stack.callback(stack.close)
    return stack


def _role(stack: Any) -> str:
    return "client" if stack.template.parameters.get("Mode") == "client" else "admin"


def _with_database(stack: Any, exit_stack: ExitStack, role: str, logical_id: str | None = None) -> None:
    """The embedded default: DATABASE_URL from the env-vars file or the shell,
    else a throwaway cluster with a migrated database of the role (an Admin one
    with the sample events' customer registered)."""
    from fleet.errors import DatabaseUnavailable

    from fleet_local.embedded import embedded_database

    params = stack.env_vars.setdefault("Parameters", {})
    own = stack.env_vars.get(logical_id, {}).get("DATABASE_URL") if logical_id else None
    given = own or params.get("DATABASE_URL") or os.environ.get("DATABASE_URL")
    profile = stack.template.parameters.get("DatabaseProfile") or "auto"
    try:
        url = exit_stack.enter_context(embedded_database(role, given, profile))
    except DatabaseUnavailable as exc:
        where = "the env-vars file" if (own or params.get("DATABASE_URL")) else "the environment"
        raise NotDone(
            f"the DATABASE_URL of {where} does not answer ({exc}); start that server,"
            " or leave DATABASE_URL out and a throwaway database is started"
        ) from None
    if not own:
        params["DATABASE_URL"] = url
    if not given:
        print(f"embedded database ({role}): {url}", file=sys.stderr)


def _with_push_defaults(stack: Any, exit_stack: ExitStack) -> None:
    """A local DynamoDB unless one is configured, and a word on what the push
    still needs when INGEST_URL is not set."""
    from fleet_local.embedded import embedded_dynamodb, ensure_state_table, push_settings_missing

    push_env = stack.env_vars.setdefault("PushFunction", {})
    if not (push_env.get("DYNAMODB_ENDPOINT_URL") or os.environ.get("DYNAMODB_ENDPOINT_URL")):
        endpoint = exit_stack.enter_context(embedded_dynamodb())
        push_env["DYNAMODB_ENDPOINT_URL"] = endpoint
        table = stack.environment("PushFunction").get("PUSH_STATE_TABLE", "PushStateTable")
        ensure_state_table(endpoint, table)
        print(f"embedded DynamoDB: {endpoint} (table {table})", file=sys.stderr)
    missing = push_settings_missing(stack)
    if missing:
        print(f"warning: {missing}", file=sys.stderr)


def _cmd_invoke(args: argparse.Namespace) -> int:
    from fleet_local.runner import InvokeError

    try:
        event = json.loads(args.event.read_text()) if args.event else {}
    except (OSError, ValueError) as exc:
        raise NotDone(f"the event file cannot be read: {exc}") from None
    with ExitStack() as es:
        stack = _open_stack(args, es)
        try:
            stack.spec(args.logical_id)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return NOT_DONE
        _with_database(stack, es, _role(stack), args.logical_id)
        if args.logical_id == "PushFunction":
            _with_push_defaults(stack, es)
        try:
            result = stack.invoke(args.logical_id, event)
        except InvokeError as exc:
            print(json.dumps(exc.payload, indent=2))
            return NOT_RIGHT
    print(json.dumps(result, indent=2, default=str))
    return DONE


def _cmd_start_api(args: argparse.Namespace) -> int:
    from fleet_local.embedded import wait_forever
    from fleet_local.runner import serve_api

    with ExitStack() as es:
        stack = _open_stack(args, es, role_hint="admin")
        _with_database(stack, es, "admin")
        api = es.enter_context(serve_api(stack, args.host, args.port))
        for route in api.routes:
            print(f"mounted {route.route_key:<36} -> {route.function_name}", file=sys.stderr)
        print(f"serving on {api.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        wait_forever(threading.Event())
    return DONE


def _cmd_schedule(args: argparse.Namespace) -> int:
    from fleet_local.schedules import run_schedules

    with ExitStack() as es:
        stack = _open_stack(args, es, role_hint="client")
        schedules = stack.schedules()
        if not schedules:
            print(
                "error: nothing is scheduled with these parameters (the push needs Mode=client IngestEnabled=true,"
                " the maintenance Mode=admin)",
                file=sys.stderr,
            )
            return NOT_DONE
        _with_database(stack, es, _role(stack))
        if any(logical_id == "PushFunction" for logical_id, _, _ in schedules):
            _with_push_defaults(stack, es)
        for logical_id, name, expr in schedules:
            print(f"scheduled {logical_id} ({name}): {expr}", file=sys.stderr)
        stop = threading.Event()
        count = 0

        def on_result(logical_id: str, result: Any) -> None:
            nonlocal count
            count += 1
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            print(f"[{stamp}] {logical_id}: {json.dumps(result, default=str)}", flush=True)
            if args.ticks and count >= args.ticks:
                stop.set()

        run_schedules(stack, stop, on_result)  # Ctrl-C and SIGTERM end it (see _ends_cleanly)
    return DONE


def _cmd_demo(args: argparse.Namespace) -> int:
    from fleet_local.demo import run_demo

    result = run_demo(server_url=getattr(args, "database_url", None), out=lambda line: print(line, flush=True))
    return DONE if result.ok else NOT_RIGHT


def _cmd_status(args: argparse.Namespace) -> int:
    from fleet import db

    from fleet_local.status import failed_background_jobs, fleet_status, render

    url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    if not url:
        raise NotDone("no database: pass --database-url or set DATABASE_URL")
    with db.connect(url) as conn:
        rows = fleet_status(conn)
        failed = failed_background_jobs(conn)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(render(rows, datetime.now(UTC), failed))
    return DONE
