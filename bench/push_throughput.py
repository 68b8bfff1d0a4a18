"""Push throughput: the push path from the Client database to gzip request bodies
(HTTP excluded: a sink that only counts bytes), against COPY (SELECT ...) TO STDOUT
of the same rows from the same database."""

from __future__ import annotations

import statistics
import time

import psycopg
from fleet.models import MEASUREMENT_FIELDS
from fleet.push import source as push_source
from fleet.push.cursor import START
from fleet.push.queries import XID_ORDER
from fleet.push.service import PushService
from fleet.push.state import ResourceState
from fleet.push.transport import Reply

from bench.common import database, server, summary
from bench.ingest_throughput import COLUMNS


class MemoryState:
    """The DynamoDB state store's interface, in memory (DynamoDB is not measured)."""

    def __init__(self) -> None:
        self.items: dict[str, ResourceState] = {}

    def acquire(self, resource: str, owner: str, now: float, lease_seconds: int) -> ResourceState:
        state = self.items.setdefault(resource, ResourceState(resource, initialized=True))
        return state

    def save(self, state: ResourceState, owner: str) -> None:
        state.version += 1

    def release(self, resource: str, owner: str) -> None:
        pass

    def get(self, resource: str) -> ResourceState | None:
        return self.items.get(resource)


class Sink:
    """Stands in for the ingest API: counts bodies and bytes, answers 200 (after
    ``latency`` seconds, like a round trip to a real ingest, when given)."""

    def __init__(self, latency: float = 0.0) -> None:
        self.bytes = 0
        self.batches = 0
        self.latency = latency

    def post_batch(self, batch_type: str, body: bytes, cursor: str, batch_id: str) -> Reply:
        self.bytes += len(body)
        self.batches += 1
        if self.latency:
            time.sleep(self.latency)
        return Reply(200, {"accepted": 0, "duplicates": 0, "rejected": 0})

    def state(self) -> Reply:
        return Reply(200, {"ledger": {}, "limits": {}})


LATENCY_S = 0.02  # a 5,000-row batch through API Gateway and the ingest handler takes longer


def _fill(url: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO monitoring.power_measurements"
            " (time, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)"
            " SELECT '2026-01-01T00:00:00Z'::timestamptz + make_interval(mins => g / 50), 'meter-' || (g %% 50),"
            "        100 + (g %% 997) * 1.37, 230 + (g %% 7) * 0.1, 1.5 + (g %% 13) * 0.11, 1e6 + g * 1.5,"
            "        0.9 + (g %% 10) * 0.01, 50 + (g %% 5) * 0.01"
            " FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE monitoring.power_measurements")


# The rows in the order the push reads them.
_ORDER = f"ORDER BY {XID_ORDER}"
_COPY_COLUMNS = ", ".join(COLUMNS)
# The body's items as COPY itself writes them: each key a constant column, the time
# and device id through to_json (PostgreSQL's own JSON, as the push's slow path
# writes them), the metrics as float8's text; tab-delimited CSV that never quotes
# (its quote character cannot occur), so deleting the tabs leaves the items' JSON.
_JSON_COLUMNS = ", ".join(
    ["'{\"time\":'", "to_json(time)", "',\"device_id\":'", "to_json(device_id)"]
    + [f"',\"{name}\":', {name}::float8" for name in MEASUREMENT_FIELDS]
    + ["'}'"]
)
_COPY = f"COPY (SELECT {_COPY_COLUMNS} FROM monitoring.power_measurements {_ORDER}) TO STDOUT"
_JSON_COPY = (
    f"COPY (SELECT {_JSON_COLUMNS} FROM monitoring.power_measurements {_ORDER})"
    " TO STDOUT (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01', NULL 'null')"
)


def _copy_json(conn: psycopg.Connection, keep: int) -> tuple[float, list[bytes]]:
    """Seconds for COPY to write every row's item JSON, and the first ``keep`` items."""
    kept: list[bytes] = []
    start = time.perf_counter()
    with conn.cursor().copy(_JSON_COPY) as cp:
        for chunk in cp:
            if len(kept) < keep:
                kept.append(bytes(chunk))
    elapsed = time.perf_counter() - start
    return elapsed, [item.translate(None, b"\t\n") for item in kept]


def _copy(conn: psycopg.Connection) -> tuple[float, int]:
    """Seconds for COPY TO of the bare columns, and the bytes it wrote."""
    out = 0
    start = time.perf_counter()
    with conn.cursor().copy(_COPY) as cp:
        for chunk in cp:
            out += len(chunk)
    return time.perf_counter() - start, out


def run(server_url: str, rows: int, batch: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"copy": [], "copy_json": [], "push": [], "push_serial": []}
    sink = Sink()
    with database(server_url, "client") as url:
        _fill(url, rows)
        with psycopg.connect(url, autocommit=True) as conn:
            _, items = _copy_json(conn, 50)
            # The reference writes the very items the push sends, or it would not be one.
            pushed = push_source.read_measurements(conn, START, len(items)).body()
            assert pushed == b'{"items":[' + b",".join(items) + b"]}", "COPY's JSON differs from the push's"
            # Baselines and push alternate, round after round, so that background load
            # falls on all alike; each figure is the median over the rounds.
            for _ in range(rounds):
                copy_s, out = _copy(conn)
                times["copy"].append(copy_s)
                times["copy_json"].append(_copy_json(conn, 0)[0])
                times["push"].append(_push(url, sink, rows, batch))
                times["push_serial"].append(_push(url, Sink(), rows, batch, read_ahead=False))
        # With a round trip to wait for, as in production: read-ahead on and off.
        latency_rows = min(rows, 100 * batch)
        overlap = {on: latency_rows / _push(url, Sink(LATENCY_S), latency_rows, batch, on) for on in (True, False)}
    rate = {name: rows / statistics.median(seconds) for name, seconds in times.items()}

    def ratio(name: str, over: str = "copy") -> float:
        """The median over the rounds of this figure's rows/s against the other's."""
        return statistics.median(b / a for a, b in zip(times[name], times[over], strict=True))

    push_ratios = sorted(c / p for c, p in zip(times["copy"], times["push"], strict=True))
    rounds_note = f"median of {rounds} rounds" if rounds > 1 else "one round"
    summary("push.copy_to_stdout", rate["copy"], "rows/s", 1.0, f"baseline: {out / rows:.0f} bytes/row of text")
    summary(
        "push.copy_json_to_stdout",
        rate["copy_json"],
        "rows/s",
        ratio("copy_json"),
        "the items' JSON written by COPY itself, nothing more: what the database alone manages for a JSON body",
    )
    summary(
        "push.path",
        rate["push"],
        "rows/s",
        ratio("push"),
        f"target >= 0.5 x COPY TO; {rounds_note} ({push_ratios[0]:.3f}-{push_ratios[-1]:.3f});"
        f" {ratio('push', 'copy_json'):.2f} x COPY's own JSON; {sink.bytes / rows / rounds:.1f} gzip bytes/row",
    )
    summary(
        "push.read_ahead_without_round_trip",
        rate["push"],
        "rows/s",
        ratio("push", "push_serial"),
        f"vs read-ahead off ({rate['push_serial']:.0f} rows/s, {ratio('push_serial'):.3f} x COPY TO);"
        " a sink that answers at once",
    )
    summary(
        "push.read_ahead_with_round_trip",
        overlap[True],
        "rows/s",
        overlap[True] / overlap[False],
        f"vs read-ahead off ({overlap[False]:.0f} rows/s); sink answers after {LATENCY_S * 1000:.0f} ms",
    )
    return {
        "copy": rate["copy"],
        "copy_json": rate["copy_json"],
        "push": rate["push"],
        "push_serial": rate["push_serial"],
        "read_ahead": overlap[True],
        "no_read_ahead": overlap[False],
    }


def _push(url: str, sink: Sink, rows: int, batch: int, read_ahead: bool = True) -> float:
    """Seconds for one tick to push the first ``rows`` rows (the state starts empty)."""
    service = PushService(
        lambda: psycopg.connect(url, autocommit=True, prepare_threshold=None),
        MemoryState(),  # type: ignore[arg-type]
        sink,  # type: ignore[arg-type]
        batch_size=batch,
        max_batches=rows // batch,
        read_ahead=read_ahead,
    )
    start = time.perf_counter()
    report = service.tick()
    elapsed = time.perf_counter() - start
    pushed = report.resources["measurements"].rows
    assert pushed == rows, (pushed, rows)
    return elapsed


def main(smoke: bool = False) -> dict[str, float]:
    rows, batch, rounds = (3_000, 500, 1) if smoke else (500_000, 5_000, 5)
    with server() as (url, _):
        return run(url, rows, batch, rounds)
