-- The Monday 00:00 UTC that starts the week of ts: the weekly partitions' bounds
-- (fleet.ensure_measurement_partitions) and the archive's end.
CREATE OR REPLACE FUNCTION fleet.week_start(ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT
    RETURN date_trunc('week', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
