"""The ``fleet`` command line: migrations, customers, the local runner, the demo
and the fleet status. ``DATABASE_URL`` is the default database everywhere.

Every command ends with one of three exit statuses (as grep and diff do):
0 it did what was asked; 1 it ran, and what it checked or ran is not right (a
check that finds problems, a demo check that fails, an invoked function that
answers with an error); 2 it could not do what was asked (a usage error, as
argparse reports it; no database, or one that does not answer; a request the
domain refuses: no such customer, one that exists already, an invalid id, a
profile the server cannot have). ``local invoke`` and ``demo`` stopped by
Ctrl-C or SIGTERM end with 130; those that run until stopped (``start-api``,
``schedule``) with 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
from fleet.db import describe
from fleet.errors import FleetError

# The exit statuses (the rule is the module's docstring).
DONE = 0
NOT_RIGHT = 1
NOT_DONE = 2


class NotDone(SystemExit):
    """What was asked cannot be done as asked (no database to do it on). A
    SystemExit whose code is the message, so that a caller of ``main`` sees it
    raised; the ``fleet`` program (``run``) prints it and ends with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def _database_url(args: argparse.Namespace) -> str:
    url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    if not url:
        raise NotDone("no database: pass --database-url or set DATABASE_URL")
    return str(url)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from fleet import db
    from fleet.schema.migrate import migrate
    from fleet.schema.profiles import ProfileSettings, apply_profile

    mapping = None
    if args.role == "client" and args.mapping is not None:
        from fleet.push.mapping import load_mapping

        mapping = load_mapping(args.mapping)
    with db.connect(_database_url(args)) as conn:
        result = migrate(conn, args.role, args.profile, mapping=mapping)
        changes: list[str] = []
        if args.role == "admin":
            changes = apply_profile(conn, result.profile, ProfileSettings()).changes
    print(f"role: {result.role}")
    print(f"profile: {result.profile}")
    for name in result.applied:
        print(f"applied: {name}")
    for name in result.definitions_applied:
        print(f"definition applied: {name}")
    if not result.applied and not result.definitions_applied:
        print(
            f"nothing to apply ({len(result.already_applied)} migrations already applied,"
            f" {len(result.definitions_unchanged)} definitions unchanged)"
        )
    for change in changes:
        print(f"profile set-up: {change}")
    for change in result.changes:
        print(f"portal: {change}")
    for notice in result.notices:
        print(f"notice: {notice}")
    return DONE


def _cmd_check(args: argparse.Namespace) -> int:
    """Admin: what a migration would apply. Client: the source mapping against the
    portal database's catalogue."""
    if args.role == "admin":
        return _check_admin(args)
    from fleet import db
    from fleet.push.catalogue import check
    from fleet.push.mapping import configured_mapping, load_mapping

    mapping = load_mapping(args.mapping) if args.mapping is not None else configured_mapping()
    with db.connect(_database_url(args)) as conn:
        report = check(conn, mapping, absent_ok=mapping.is_default, need_cursor=False)
    for resource, table in report.tables.items():
        if table is not None:
            cursor = "present" if table.cursor else "added by `fleet db migrate --role client`"
            extra = f"; cursor column push_xid: {cursor}" if resource == "measurements" else ""
            print(f"{resource}: {table.plain} ({len([c for c in table.columns.values() if c])} columns mapped){extra}")
        elif mapping.is_default and not report.errors_of(resource):
            print(f"{resource}: {mapping.table(resource).table} absent; `fleet db migrate --role client` creates it")
    for notice in report.notices:
        print(f"notice: {notice}")
    if report.errors:
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{len(report.errors)} problems: the push cannot read this portal as mapped", file=sys.stderr)
        return NOT_RIGHT
    print("the source mapping fits the portal database")
    return DONE


def _check_admin(args: argparse.Namespace) -> int:
    """The versioned migrations and repeatable definitions against the Admin database,
    changing nothing."""
    from fleet import db
    from fleet.schema.runner import schema_status

    with db.connect(_database_url(args)) as conn:
        status = schema_status(conn, "admin", args.profile)
    print(f"profile: {status.profile}")
    for notice in status.notices:
        print(f"notice: {notice}")
    print(f"migrations: {len(status.applied)} applied, {len(status.pending)} pending")
    for name in status.pending:
        print(f"pending: {name}")
    print(f"definitions: {len(status.definitions_current)} current, {len(status.definitions_due)} to apply")
    for name in status.definitions_due:
        print(f"definition to apply: {name}")
    for name in status.edited:
        print(f"error: {name} was changed after it was applied; a migration refuses it", file=sys.stderr)
    return NOT_RIGHT if status.edited else DONE


def _cmd_customers(args: argparse.Namespace) -> int:
    from fleet import customers, db

    with db.connect(_database_url(args)) as conn:
        result: Any
        if args.action == "create":
            result = customers.create(conn, args.id, args.name).as_dict()
            if not args.json:
                print(f"customer {args.id} created")
                print(f"token (shown once, store it now): {result['token']}")
                return DONE
        elif args.action == "list":
            result = customers.list_customers(conn)
            if not args.json:
                for c in result:
                    print(
                        f"{c['id']:<16} {c['status']:<9} tokens={c['live_tokens']} "
                        f"last_seen={c['last_seen_at'] or '-'}  {c['name']}"
                    )
                return DONE
        elif args.action == "rotate-token":
            issued = customers.rotate_token(conn, args.id, timedelta(days=args.grace_days))
            result = issued.as_dict()
            if not args.json:
                print(f"new token for {args.id} (shown once): {issued.token}")
                print(f"older tokens keep working for {args.grace_days} days")
                return DONE
        elif args.action == "revoke-token":
            revoked = customers.revoke_tokens(conn, args.id, keep_newest=args.keep_newest)
            result = {"revoked": revoked}
            if not args.json:
                kept = ", the newest kept" if args.keep_newest else ""
                print(f"{revoked} token{'s' if revoked != 1 else ''} of {args.id} revoked{kept}")
                return DONE
        else:
            status = "disabled" if args.action == "disable" else "active"
            customers.set_status(conn, args.id, status)
            result = {"customer_id": args.id, "status": status}
            if not args.json:
                print(f"customer {args.id} {'disabled' if status == 'disabled' else 'enabled'}")
                return DONE
    print(json.dumps(result, indent=2, default=str))
    return DONE


_MAPPING_HELP = "the source mapping file (default: PUSH_SOURCE_MAPPING, else the default tables)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__)
    # Before the command or after it: ``fleet --database-url URL customers list`` too.
    parser.add_argument("--database-url", default=argparse.SUPPRESS, help="default: DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    dbp = sub.add_parser("db", help="database migrations").add_subparsers(dest="db_command", required=True)
    mig = dbp.add_parser("migrate", help="apply the migrations of a role")
    mig.add_argument("--role", choices=["admin", "client"], required=True)
    mig.add_argument("--profile", choices=["auto", "timescale", "postgres"], default="auto")
    mig.add_argument("--database-url", default=argparse.SUPPRESS)
    mig.add_argument("--mapping", help=f"client: {_MAPPING_HELP}")
    mig.set_defaults(func=_cmd_migrate)
    chk = dbp.add_parser(
        "check", help="admin: what a migration would apply; client: the source mapping against the portal database"
    )
    chk.add_argument("--role", choices=["admin", "client"], required=True)
    chk.add_argument("--profile", choices=["auto", "timescale", "postgres"], default="auto", help="admin only")
    chk.add_argument("--mapping", help=f"client: {_MAPPING_HELP}")
    chk.add_argument("--database-url", default=argparse.SUPPRESS)
    chk.set_defaults(func=_cmd_check)

    cust = sub.add_parser("customers", help="customer administration (Admin database)")
    cust.add_argument("--database-url", default=argparse.SUPPRESS)
    csub = cust.add_subparsers(dest="action", required=True)
    create = csub.add_parser("create", help="create a customer and print its token once")
    create.add_argument("id")
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true")
    lst = csub.add_parser("list")
    lst.add_argument("--json", action="store_true")
    rot = csub.add_parser("rotate-token", help="issue a new token; old ones expire after a grace period")
    rot.add_argument("id")
    rot.add_argument("--grace-days", type=int, default=7)
    rot.add_argument("--json", action="store_true")
    rev = csub.add_parser("revoke-token", help="revoke the customer's tokens at once")
    rev.add_argument("id")
    rev.add_argument("--keep-newest", action="store_true", help="keep the newest token (end a rotation early)")
    rev.add_argument("--json", action="store_true")
    for name in ("disable", "enable"):
        p = csub.add_parser(name)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
    for p in csub.choices.values():  # the option works after the action too
        p.add_argument("--database-url", default=argparse.SUPPRESS, help="default: DATABASE_URL")
    cust.set_defaults(func=_cmd_customers)

    _add_local_commands(sub)
    return parser


def _add_local_commands(sub: Any) -> None:
    """``local``, ``demo`` and ``status`` live in a module of their own."""
    from fleet_local import local_commands

    local_commands.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or DONE)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except psycopg.Error as exc:  # e.g. a database without the fleet schema
        print(f"error: the database refused the command: {describe(exc)}", file=sys.stderr)
    return NOT_DONE


def run(argv: Sequence[str] | None = None) -> None:
    """The ``fleet`` program: ``main`` with every outcome an exit status of the rule."""
    try:
        status = main(argv)
    except NotDone as exc:
        print(exc.code, file=sys.stderr)
        status = NOT_DONE
    sys.exit(status)


if __name__ == "__main__":
    run()
