-- Client (portal) database: the tables the portal writes, and what the push
-- cursor needs. A portal that already has these tables keeps its data: every
-- step adds only what is missing and none rewrites the table.
CREATE SCHEMA IF NOT EXISTS monitoring;

CREATE TABLE IF NOT EXISTS monitoring.sites (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    timezone   text,
    latitude   double precision,
    longitude  double precision,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS monitoring.devices (
    id               text PRIMARY KEY,
    site_id          text NOT NULL REFERENCES monitoring.sites (id),
    name             text NOT NULL,
    model            text,
    firmware_version text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS monitoring.power_measurements (
    time         timestamptz NOT NULL,
    device_id    text NOT NULL,
    power_w      double precision,
    voltage_v    double precision,
    current_a    double precision,
    energy_wh    double precision,
    power_factor double precision,
    frequency_hz double precision,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- On an existing table: now() is stable, so this is a catalogue-only change (the
-- value of the ALTER's moment is stored once for the old rows), not a rewrite.
ALTER TABLE monitoring.power_measurements
    ADD COLUMN IF NOT EXISTS received_at timestamptz NOT NULL DEFAULT now();

-- The push cursor's total order. received_at cannot be one: many rows share it,
-- and it is the writing transaction's *start* time, so a late commit carries an
-- older value than rows already pushed. The writing transaction's id can: the push
-- reads only ids below pg_snapshot_xmin(pg_current_snapshot()), behind which every
-- transaction has finished, so no row can appear behind the cursor later.
-- Nullable first, then the default: neither step rewrites an existing table; rows
-- written before this migration keep NULL and are pushed first (legacy phase).
ALTER TABLE monitoring.power_measurements ADD COLUMN IF NOT EXISTS push_xid xid8;
ALTER TABLE monitoring.power_measurements ALTER COLUMN push_xid SET DEFAULT pg_current_xact_id();

CREATE INDEX IF NOT EXISTS power_measurements_push_cursor_idx
    ON monitoring.power_measurements (push_xid, time, device_id);
CREATE INDEX IF NOT EXISTS power_measurements_push_legacy_idx
    ON monitoring.power_measurements (time, device_id) WHERE push_xid IS NULL;
CREATE INDEX IF NOT EXISTS power_measurements_received_at_idx
    ON monitoring.power_measurements (received_at);
