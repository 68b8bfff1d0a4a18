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
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from botocore.exceptions import ClientError

from fleet.observability import logger, metrics
from fleet.push.catalogue import day_index_statement
from fleet.push.codec import gzip_body
from fleet.push.cursor import Cursor
from fleet.push.digest_queries import DigestQueries
from fleet.push.digest_state import DigestSettings, DigestState, Key, choose, key_text
from fleet.push.mapping import MappingError
from fleet.push.report import ResourceReport
from fleet.push.responses import backoff_delay
from fleet.push.source import BEGIN_SNAPSHOT, PortalSource
from fleet.push.state import PushStateStore
from fleet.push.transport import IngestClient, Reply, TransportError
from fleet.reconcile import EMPTY_HASH, HEALABLE, day_bounds

RESOURCE = "digests"
_DOCUMENT = "reconcile"  # the state item's attribute holding DigestState
_NAMESPACE = uuid.UUID("0b5d1a52-8a8e-4d0c-9a63-3f0f3b1d2c71")


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
        self._devices: set[str] | None = None  # this tick's device ids, when days are read by device
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
            text, version = self.state.document(RESOURCE, _DOCUMENT)
            doc = DigestState.loads(text)
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
                self._back_off(doc, before, exc, rep)
            if not self.state.save_document(RESOURCE, _DOCUMENT, doc.dumps(), owner, version):
                logger.warning("lease on digests lost; state not written")
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

    def _back_off(self, doc: DigestState, before: DigestState, exc: Exception, rep: ResourceReport) -> None:
        """A tick that failed: the days scanned stay pending; the findings and the round
        wait for the retry, after the server's wait or the backoff."""
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
        queries = self._statements(conn)
        if queries.days_by is None:
            self._off(queries, rep)
            return
        with conn.transaction():
            conn.execute(BEGIN_SNAPSHOT)
            self._devices = set(r[0] for r in conn.execute(queries.devices)) if queries.days_by == "device" else None
            self._scan_changed(conn, doc, cursor, deadline)
            work = choose(doc, self.settings, self.clock(), today)
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

    @staticmethod
    def _off(queries: DigestQueries, rep: ResourceReport) -> None:
        """No index reads a UTC day of the portal's measurements: digesting a day would
        scan the whole table, so reconciliation waits (nothing pending is lost: the
        changed-days scan resumes from where it stood) and says what to create."""
        table = queries.table
        statement = day_index_statement(table.schema, table.name, table.columns)
        rep.outcome = "skipped"
        rep.detail = (
            f"reconciliation is off: no index reads one UTC day of {table.plain}; create one ({statement}),"
            ' or set "reconcile_day_index": true in the source mapping and run the client bootstrap'
        )
        metrics.add_metric(name="ReconcileOff", unit="Count", value=1)
        logger.warning(rep.detail)

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
                    pending.add(key_text((device, day)))
            _, _, xid, at, device, count = rows[0]
            position = Cursor(position.phase, int(xid or 0), at or "infinity", device or "")
            if count < self.settings.scan_rows and position.phase == cursor.phase:
                break
        doc.position = position.encode()
        doc.pending = sorted(pending)

    def _digests(
        self, conn: psycopg.Connection, cursor: Cursor, work: dict[date, set[str] | None], deadline: float
    ) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        known = self._devices  # by device: the ids the portal's rows hold
        for day, devices in sorted(work.items()):
            asked = devices if known is None or devices is None else devices & known
            ask = sorted(known) if asked is None and known is not None else asked
            found: dict[str, tuple[int, str]] = {}
            if ask is None or ask:
                statement = self._statements(conn).digest[(cursor.phase, ask is not None)]
                params = self._day_params(cursor, day)
                if ask is not None:
                    params["devices"] = sorted(ask)
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
            known = doc.open.get(key_text(key))
            attempts = known["a"] if known else 0
            if d["outcome"] not in HEALABLE or attempts >= self.settings.heal_attempts:
                continue
            device, day = key
            if self._devices is not None and device not in self._devices:
                continue  # no row of it on the portal: nothing to re-send
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
        checked = {key_text(k) for k in digests}
        asked = {key_text((dev, day)) for day, devices in work.items() if devices for dev in devices}
        doc.pending = [p for p in doc.pending if p not in checked and p not in asked]
        for key in digests:
            text = key_text(key)
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
