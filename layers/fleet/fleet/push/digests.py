"""Reconciliation on the push side: which device-days to digest each tick, the
portal's digests (fleet/reconcile.py), and healing what the Admin answers differs.

Each tick, after the measurements, as a resource of its own (``digests``: its own
lease, backoff and state item; a failure here is reported here and stops nothing):

* **changed days**: the days of the rows the measurement cursor has passed since the
  last tick, read from the cursor's own order and index in bounded chunks (never the
  whole table), and kept as a bounded list of pending device-days;
* **rolling re-check**: every day of the last ``horizon_days`` once a ``period_s``,
  paced so a round is done in 80 % of the period, a few days a tick;
* **confirmation**: a device-day re-sent last tick is digested again.

A digest covers only rows the cursor has passed (the Admin has been sent those and
no others) and rows the ingest accepts (a reading it refuses is in its quarantine,
not in the table). The Admin answers which device-days differ; for one it lacks rows
of (``missing``, ``differs``) the rows are re-sent as measurement batches (harmless:
ON CONFLICT DO NOTHING) and the next tick's digest confirms, up to ``heal_attempts``
times. Rows the Admin holds and the portal does not (``extra``) are reported, never
deleted. ``ReconcileUnhealed`` counts the device-days still differing after
``alarm_ticks`` ticks.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from botocore.exceptions import ClientError
from psycopg import sql

from fleet.models import MEASUREMENT_FIELDS
from fleet.observability import logger, metrics
from fleet.push.mapping import CURSOR_COLUMN, MappingError, ResolvedTable
from fleet.push.service import ResourceReport, backoff_delay
from fleet.push.source import Cursor, PortalSource, cursor_key, number_expression
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient, Reply, TransportError, gzip_body
from fleet.reconcile import EMPTY_HASH, HEALABLE, RowColumns, day_bounds, digest_sql, row_hash_sql

RESOURCE = "digests"
_NAMESPACE = uuid.UUID("0b5d1a52-8a8e-4d0c-9a63-3f0f3b1d2c71")
_FIRST_DAY, _LAST_DAY = "0001-01-02", "9999-12-30"  # what a date and RFC 3339 both hold

# As the push reads (fleet.push.source): times written in UTC and ISO form (the scan's
# position is read back from its text in another session), and any extra_float_digits
# above 0 (a ``real`` is read through its text: the digest's value is the one sent).
_SETTINGS = (
    "SELECT CASE WHEN current_setting('TimeZone') NOT IN ('UTC', 'Etc/UTC')"
    " THEN set_config('TimeZone', 'UTC', true) END,"
    " CASE WHEN left(current_setting('DateStyle'), 4) <> 'ISO,'"
    " THEN set_config('DateStyle', 'ISO, YMD', true) END,"
    " CASE WHEN current_setting('extra_float_digits')::int < 1"
    " THEN set_config('extra_float_digits', '1', true) END"
)

# The days of the rows past the last scan's position, up to the cursor, in the
# cursor's order (its index), a bounded chunk at a time; and the chunk's last key.
_CHANGED = """
WITH chunk AS MATERIALIZED (
    SELECT {xid} AS x, {at} AS t, {device} AS d FROM {table}
    WHERE {where} ORDER BY {order} LIMIT %(limit)s
)
SELECT g.d, g.day, l.x, l.t, l.d, (SELECT count(*) FROM chunk)
FROM (SELECT x::text, t::text, d::text FROM chunk ORDER BY x DESC, t DESC, d DESC LIMIT 1) l
LEFT JOIN (SELECT d::text AS d, (t AT TIME ZONE 'UTC')::date AS day FROM chunk
           WHERE d IS NOT NULL AND t >= '{first}' AND t < '{last}' GROUP BY 1, 2) g ON true
"""


class DigestQueries:
    """The digests' statements for the measurements table as the source mapping and
    the catalogue have it (fleet.push.source.MeasurementQueries is the push's own):
    the time as timestamptz (a ``timestamp`` read in the mapping's zone), the device
    id as text, each metric as float8 in the contract's unit, scale applied: the very
    expressions the push sends, so the digest is that of what the ingest stores. A
    day's rows are read by two partial indexes on (time, device id), both built
    concurrently by the client bootstrap (fleet.migrations.prepare_cursor) on the
    same expressions: the legacy index and the day index."""

    def __init__(self, table: ResolvedTable, conn: psycopg.Connection) -> None:
        def text(part: sql.Composable) -> str:
            # Fragments of statements that take %(name)s parameters: a quoted name
            # holding "%" must not read as one.
            return part.as_string(conn).replace("%", "%%")

        at, device = (text(e) for e in cursor_key(table))
        xid = text(sql.Identifier("src", CURSOR_COLUMN))
        metrics = tuple(text(number_expression(table, m)) for m in MEASUREMENT_FIELDS)
        source = text(sql.SQL("{} AS src").format(table.ident))
        self.table = table
        self.columns = RowColumns(at, device, metrics)
        # Rows the ingest stores: a device id of 1..64 characters, finite metrics.
        ingestible = " AND ".join(
            [
                f"{device} IS NOT NULL",
                f"length({device}) BETWEEN 1 AND 64",
                *(f"coalesce(abs({m}) < 'Infinity'::float8, true)" for m in metrics),
            ]
        )
        # Rows the measurement cursor has passed (fleet.push.source's order: legacy rows
        # first), in two parts, each read by its own partial index on (time, device
        # id): rows from before the cursor column (push_xid NULL: the legacy index)
        # and the others (the day index).
        behind = {
            "legacy": [f"{xid} IS NULL AND ({at}, {device}) <= (%(ct)s::timestamptz, %(cd)s)"],
            "xid": [
                f"{xid} IS NULL",
                f"{xid} IS NOT NULL AND ({xid}, {at}, {device}) <= (%(cx)s::xid8, %(ct)s::timestamptz, %(cd)s)",
            ],
        }

        def day_rows(phase: str, some_devices: bool, columns: str, also: str = "") -> str:
            """The ingestible rows of one day the cursor has passed (of some devices)."""
            devices = f" AND {device} = ANY(%(devices)s::text[])" if some_devices else ""
            return " UNION ALL ".join(
                f"SELECT {columns} FROM {source} WHERE {part} AND {at} >= %(start)s AND {at} <= %(last)s"
                f" AND {ingestible}{devices}{also}"
                for part in behind[phase]
            )

        row = f"{device} AS device_id, {row_hash_sql(self.columns)} AS h"
        self.digest = {
            (phase, some): (
                f"SELECT device_id, {digest_sql('h')} FROM ({day_rows(phase, some, row)}) r GROUP BY device_id"
            )
            for phase in ("legacy", "xid")
            for some in (False, True)
        }
        # One device-day's rows after a time, as a request body: PostgreSQL's JSON of
        # the values (times with their offset, float8 in their shortest exact digits).
        item = (
            f"{at} AS t, json_build_object('time', {at}, 'device_id', {device}, "
            + ", ".join(f"'{name}', {m}" for name, m in zip(MEASUREMENT_FIELDS, metrics, strict=True))
            + ")::text AS item"
        )
        after = f" AND {at} > %(after)s::timestamptz"
        self.resend = {
            phase: (
                "SELECT count(*), max(t)::text,"
                " '{\"items\":[' || coalesce(string_agg(item, ',' ORDER BY t), '') || ']}'"
                f" FROM (SELECT t, item FROM ({day_rows(phase, True, item, after)}) u"
                " ORDER BY t LIMIT %(limit)s) c"
            )
            for phase in ("legacy", "xid")
        }
        changed_where = {
            "legacy": f"{xid} IS NULL AND ({at}, {device}) > (%(pt)s::timestamptz, %(pd)s)",
            "xid": f"{xid} IS NOT NULL AND ({xid}, {at}, {device}) > (%(px)s::xid8, %(pt)s::timestamptz, %(pd)s)",
        }
        changed_upto = {
            "legacy": f" AND ({at}, {device}) <= (%(ct)s::timestamptz, %(cd)s)",
            "xid": f" AND ({xid}, {at}, {device}) <= (%(cx)s::xid8, %(ct)s::timestamptz, %(cd)s)",
        }
        changed_order = {"legacy": f"{at}, {device}", "xid": f"{xid}, {at}, {device}"}
        self.changed = {
            (phase, upto): _CHANGED.format(
                xid=xid,
                at=at,
                device=device,
                table=source,
                where=changed_where[phase] + (changed_upto[phase] if upto else ""),
                order=changed_order[phase],
                first=_FIRST_DAY,
                last=_LAST_DAY,
            )
            for phase in ("legacy", "xid")
            for upto in (False, True)
        }


@dataclass(frozen=True)
class DigestSettings:
    horizon_days: int = 90  # the rolling re-check covers this many days before today
    period_s: float = 86_400.0  # ...once within this period
    alarm_ticks: int = 5  # a mismatch not healed within this many ticks raises the alarm
    heal_attempts: int = 3  # re-sends of one device-day before it is left to be reported
    batch_size: int = 5000  # rows per re-sent batch, digests per digests batch
    scan_rows: int = 100_000  # rows of the changed-days scan per chunk
    scan_chunks: int = 5  # chunks of it per tick at most
    max_pending: int = 5000  # changed device-days kept waiting (bounds the state item)
    days_per_tick: int = 30  # distinct days digested per tick at most


Key = tuple[str, date]  # (device_id, day)


def _key_text(key: Key) -> str:
    return f"{key[1].isoformat()}|{key[0]}"


def _key_of(text: str) -> Key:
    day, _, device = text.partition("|")
    return device, date.fromisoformat(day)


@dataclass
class DigestState:
    """The ``digests`` item's document (one attribute, JSON)."""

    position: str | None = None  # the changed-days scan's cursor
    pending: list[str] = field(default_factory=list)  # changed device-days not yet digested
    open: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> outcome, first tick, attempts
    round_started_at: float | None = None
    round_first_day: str | None = None
    round_done: int = 0
    tick: int = 0
    failures: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None

    @classmethod
    def loads(cls, text: str | None) -> DigestState:
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def dumps(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"), sort_keys=True)


class _Stop(Exception):
    """The server did not take a batch: the tick's digests end here (backoff)."""

    def __init__(self, error: str, wait: float | None = None) -> None:
        super().__init__(error)
        self.wait = wait


class DigestPush:
    def __init__(
        self,
        state: PushStateStore,
        client: IngestClient,
        settings: DigestSettings,
        clock: Callable[[], float],
        rng: Callable[[], float],
        lease_seconds: int,
        source: PortalSource | None = None,
    ) -> None:
        self.source = source or PortalSource()  # where the portal keeps its measurements
        self._queries: DigestQueries | None = None  # this tick's, from the catalogue
        self.state = state
        self.client = client
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self.lease_seconds = lease_seconds

    # -- the resource ------------------------------------------------------------------
    def run(self, conn: psycopg.Connection, owner: str, deadline: float) -> ResourceReport:
        rep = ResourceReport(RESOURCE)
        try:
            now = self.clock()
            held = self.state.acquire(RESOURCE, owner, now, self.lease_seconds)
            if held is None:
                rep.outcome, rep.detail = "leased", "another invocation holds the lease"
                return rep
        except ClientError as exc:
            rep.outcome, rep.detail = "failed", f"state table: {exc}"[:500]
            return rep
        try:
            item = self.state.table.get_item(Key={"resource": RESOURCE}, ConsistentRead=True).get("Item", {})
            doc = DigestState.loads(item.get("reconcile"))
            version = int(item.get("version", 0))
            if doc.next_attempt_at > now:
                rep.outcome, rep.detail = "backoff", f"next attempt in {doc.next_attempt_at - now:.0f} s"
                return rep
            if now >= deadline:
                rep.outcome, rep.detail = "idle", "time budget of the tick used"
                return rep
            before = DigestState.loads(doc.dumps())
            try:
                self._tick(conn, doc, rep, deadline)
                doc.failures, doc.last_error = 0, None
            except (_Stop, TransportError, MappingError, psycopg.Error) as exc:
                # Days scanned stay pending; the findings and the round wait for the retry.
                doc.open, doc.round_started_at = before.open, before.round_started_at
                doc.round_first_day, doc.round_done = before.round_first_day, before.round_done
                wait = exc.wait if isinstance(exc, _Stop) else None
                doc.failures += 1
                delay = backoff_delay(doc.failures, self.rng) if wait is None else min(wait, 3600.0)
                doc.next_attempt_at = self.clock() + delay
                doc.last_error = (str(exc) if isinstance(exc, _Stop) else f"{type(exc).__name__}: {exc}")[:500]
                rep.outcome, rep.detail = "failed", doc.last_error
                metrics.add_metric(name="PushFailures", unit="Count", value=1)
                logger.warning("digests failed; backing off", extra={"error": doc.last_error})
            self._save(doc, owner, version)
        except Exception as exc:  # noqa: BLE001 - the digests' failure stays their own
            rep.outcome, rep.detail = "failed", f"{type(exc).__name__}: {exc}"[:500]
            logger.exception("digests failed")
        finally:
            try:
                self.state.release(RESOURCE, owner)
            except ClientError as exc:  # the lease runs out by itself
                logger.warning("could not release the digests lease", extra={"error": str(exc)})
        return rep

    def _statements(self, conn: psycopg.Connection) -> DigestQueries:
        """This tick's statements, built from the mapped table as the catalogue has it
        (MappingError, naming the problem, when it no longer fits)."""
        if self._queries is None:
            self._queries = DigestQueries(self.source.table(conn, "measurements"), conn)
        return self._queries

    def _save(self, doc: DigestState, owner: str, version: int) -> None:
        try:
            self.state.table.update_item(
                Key={"resource": RESOURCE},
                UpdateExpression="SET #doc = :doc, #version = :next, #initialized = :t",
                ConditionExpression="#owner = :me AND #version = :v",
                ExpressionAttributeNames={
                    "#doc": "reconcile",
                    "#version": "version",
                    "#initialized": "initialized",
                    "#owner": "lease_owner",
                },
                ExpressionAttributeValues={
                    ":doc": doc.dumps(),
                    ":next": version + 1,
                    ":v": version,
                    ":me": owner,
                    ":t": True,
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            logger.warning("lease on digests lost; state not written")

    # -- one tick ------------------------------------------------------------------------
    def _tick(self, conn: psycopg.Connection, doc: DigestState, rep: ResourceReport, deadline: float) -> None:
        measurements = self.state.get("measurements")
        if measurements is None or not measurements.cursor:
            rep.detail = "nothing pushed yet"
            return
        cursor_text = measurements.cursor
        cursor = Cursor.decode(cursor_text)
        doc.tick += 1
        today = datetime.fromtimestamp(self.clock(), UTC).date()
        self._queries = None  # the table is looked up again each tick, as the push does
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; " + _SETTINGS)
            self._scan_changed(conn, doc, cursor, deadline)
            work = self._choose(doc, today)
            digests = self._digests(conn, cursor, work, deadline)
            differ = self._compare(doc, digests, cursor_text, rep)
            healed = self._heal(conn, doc, cursor, cursor_text, differ, rep)
        self._settle(doc, work, digests, differ, healed)
        rep.outcome = "pushed" if digests else "idle"
        unhealed = sum(1 for o in doc.open.values() if doc.tick - o["t"] >= self.settings.alarm_ticks)
        metrics.add_metric(name="ReconcileDeviceDaysChecked", unit="Count", value=len(digests))
        metrics.add_metric(name="ReconcileMismatches", unit="Count", value=len(doc.open))
        metrics.add_metric(name="ReconcileUnhealed", unit="Count", value=unhealed)
        if differ:
            logger.warning("device-days differ from the Admin", extra={"differ": list(differ.values())[:20]})

    def _scan_changed(self, conn: psycopg.Connection, doc: DigestState, cursor: Cursor, deadline: float) -> None:
        """Move the scan's position towards the cursor, adding the days of the rows
        passed to the pending list, while the list has room and the tick has time."""
        position = Cursor.decode(doc.position)
        pending = set(doc.pending)
        chunks = 0
        while (
            len(pending) < self.settings.max_pending
            and chunks < self.settings.scan_chunks
            and (self.clock() < deadline)
        ):
            if position.phase == "xid" and cursor.phase == "legacy":
                break
            chunks += 1
            query = self._statements(conn).changed[(position.phase, position.phase == cursor.phase)]
            rows = conn.execute(
                query,
                {
                    "px": str(position.xid),
                    "pt": position.time,
                    "pd": position.device,
                    "cx": str(cursor.xid),
                    "ct": cursor.time,
                    "cd": cursor.device,
                    "limit": self.settings.scan_rows,
                },
            ).fetchall()
            if not rows:  # nothing more in this phase
                if position.phase == "legacy" and cursor.phase == "xid":
                    position = Cursor("xid")
                    continue
                break
            for device, day, *_ in rows:
                if device is not None:
                    pending.add(_key_text((device, day)))
            _, _, xid, at, device, count = rows[0]
            position = Cursor(position.phase, int(xid or 0), at or "infinity", device or "")
            if count < self.settings.scan_rows and position.phase == cursor.phase:
                break
        doc.position = position.encode()
        doc.pending = sorted(pending)

    def _choose(self, doc: DigestState, today: date) -> dict[date, set[str] | None]:
        """Per day, the devices to digest (None: every device of the day)."""
        s = self.settings
        work: dict[date, set[str] | None] = {}

        def add(key: Key) -> bool:
            device, day = key
            if day > today or (day not in work and len(work) >= s.days_per_tick):
                return False
            devices = work.setdefault(day, set())
            if devices is not None:
                devices.add(device)
            return True

        for text, o in doc.open.items():  # a re-sent device-day is confirmed
            if o["o"] in HEALABLE and o["a"] <= s.heal_attempts and o.get("resent"):
                add(_key_of(text))
        for text in doc.pending:
            add(_key_of(text))
        # The rolling re-check: a round starts once a period after the last one began
        # (and the last one is done), and is paced to end within 80 % of the period.
        now = self.clock()
        if doc.round_started_at is None or (
            doc.round_done >= s.horizon_days and now - doc.round_started_at >= s.period_s
        ):
            doc.round_started_at, doc.round_done = now, 0
            doc.round_first_day = (today - timedelta(days=s.horizon_days)).isoformat()
        due = min(s.horizon_days, math.ceil(s.horizon_days * (now - doc.round_started_at) / (0.8 * s.period_s)) + 1)
        first = date.fromisoformat(doc.round_first_day or today.isoformat())
        while doc.round_done < due and len(work) < s.days_per_tick:
            work[first + timedelta(days=doc.round_done)] = None
            doc.round_done += 1
        return work

    def _digests(
        self, conn: psycopg.Connection, cursor: Cursor, work: dict[date, set[str] | None], deadline: float
    ) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        for day, devices in sorted(work.items()):
            statement = self._statements(conn).digest[(cursor.phase, devices is not None)]
            params = self._day_params(cursor, day)
            if devices is not None:
                params["devices"] = sorted(devices)
            found = {device: (int(n), h) for device, n, h in conn.execute(statement, params)}
            # A device asked for by name and holding no row that day: the Admin should
            # hold none either.
            for device in devices or ():
                found.setdefault(device, (0, EMPTY_HASH))
            for device, (count, hash_text) in found.items():
                out[(device, day)] = {"device_id": device, "day": day.isoformat(), "count": count, "hash": hash_text}
        return out

    @staticmethod
    def _day_params(cursor: Cursor, day: date) -> dict[str, Any]:
        start, last = day_bounds(day)
        return {
            "start": start,
            "last": last,
            "cx": str(cursor.xid),
            "ct": cursor.time,
            "cd": cursor.device,
        }

    def _compare(
        self, doc: DigestState, digests: dict[Key, dict[str, Any]], cursor_text: str, rep: ResourceReport
    ) -> dict[Key, dict[str, Any]]:
        """Send the digests; the device-days the Admin answers differ."""
        differ: dict[Key, dict[str, Any]] = {}
        items = [digests[k] for k in sorted(digests, key=lambda k: (k[1], k[0]))]
        size = self.settings.batch_size
        offset = 0
        while offset < len(items):
            chunk = items[offset : offset + size]
            reply = self._post("digests", chunk, json.dumps({"items": chunk}).encode(), cursor_text, rep)
            if reply is None:
                size = max(1, size // 2)
                continue
            for d in reply.body.get("differ", []):
                differ[(d["device_id"], date.fromisoformat(d["day"]))] = d
            # A digest the Admin rejected was not compared: it is no match, and is left
            # to the rolling re-check (kept pending, it would be sent again every tick).
            for error in reply.body.get("errors", []):
                item = chunk[int(error["index"])]
                key = (item["device_id"], date.fromisoformat(item["day"]))
                digests.pop(key, None)
                logger.warning("a digest was rejected", extra={"digest": item, "reason": error.get("reason")})
            offset += len(chunk)
        return differ

    def _heal(
        self,
        conn: psycopg.Connection,
        doc: DigestState,
        cursor: Cursor,
        cursor_text: str,
        differ: dict[Key, dict[str, Any]],
        rep: ResourceReport,
    ) -> set[Key]:
        """Re-send the rows of each device-day the Admin lacks rows of."""
        healed: set[Key] = set()
        for key, d in sorted(differ.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            known = doc.open.get(_key_text(key))
            attempts = known["a"] if known else 0
            if d["outcome"] not in HEALABLE or attempts >= self.settings.heal_attempts:
                continue
            device, day = key
            params = self._day_params(cursor, day) | {"devices": [device], "after": "-infinity"}
            size = self.settings.batch_size
            statement = self._statements(conn).resend[cursor.phase]
            while True:
                count, last, body = conn.execute(statement, params | {"limit": size}).fetchone()  # type: ignore[misc]
                if not count:
                    break
                if self._post("measurements", count, body.encode(), cursor_text, rep, key=params["after"]) is None:
                    size = max(1, size // 2)
                    continue
                rep.rows += count
                metrics.add_metric(name="ReconcileRowsResent", unit="Count", value=count)
                params["after"] = last
                if count < size:
                    break
            healed.add(key)
            logger.info(
                "device-day re-sent", extra={"device_id": device, "day": day.isoformat(), "outcome": d["outcome"]}
            )
        return healed

    def _post(
        self, batch_type: str, items: Any, raw: bytes, cursor_text: str, rep: ResourceReport, key: str = ""
    ) -> Reply | None:
        """One batch; None for a 413 (send it smaller). Raises _Stop when the server
        does not take it."""
        count = items if isinstance(items, int) else len(items)
        body = gzip_body(raw)
        batch_id = str(uuid.uuid5(_NAMESPACE, f"{batch_type}|{key}|{count}|{raw[:200]!r}|{len(raw)}"))
        reply = self.client.post_batch(batch_type, body, cursor_text, batch_id)
        if 200 <= reply.status < 300:
            rep.batches += 1
            rep.bytes += len(body)
            rep.rejected += int(reply.body.get("rejected", 0))
            return reply
        if reply.status == 413 and count > 1:
            return None
        if reply.status in (400, 401, 403, 413):
            raise _Stop(f"{batch_type}: {reply.status}: {reply.body.get('message', '')}", wait=1800.0)
        raise _Stop(f"{batch_type}: {reply.status}: {str(reply.body.get('message', ''))[:200]}", reply.retry_after)

    def _settle(
        self,
        doc: DigestState,
        work: dict[date, set[str] | None],
        digests: dict[Key, dict[str, Any]],
        differ: dict[Key, dict[str, Any]],
        healed: set[Key],
    ) -> None:
        """What the tick found, into the state: matched device-days leave the open
        list, differing ones enter it (or stay, with their first tick kept)."""
        checked = {_key_text(k) for k in digests}
        asked = {_key_text((dev, day)) for day, devices in work.items() if devices for dev in devices}
        doc.pending = [p for p in doc.pending if p not in checked and p not in asked]
        for key in digests:
            text = _key_text(key)
            if key not in differ:
                doc.open.pop(text, None)
                continue
            known = doc.open.get(text) or {"t": doc.tick, "a": 0}
            known["o"] = differ[key]["outcome"]
            known["resent"] = key in healed
            if key in healed:
                known["a"] += 1
            doc.open[text] = known
        if len(doc.open) > self.settings.max_pending:  # bounded: the oldest days are kept
            doc.open = dict(sorted(doc.open.items())[: self.settings.max_pending])
