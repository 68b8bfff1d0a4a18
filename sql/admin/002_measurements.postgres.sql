-- Aurora / plain PostgreSQL: power_measurements range-partitioned by week (UTC,
-- Monday-aligned). An archive partition holds everything older than the first
-- weekly one, so a back-dated row of any age finds a home; a default partition
-- catches anything beyond the weeks made ahead, and the maintenance function
-- moves such rows into their weekly partition when it creates it.
CREATE TABLE fleet.power_measurements (
    time         timestamptz NOT NULL,
    customer_id  text NOT NULL,
    device_id    text NOT NULL,
    power_w      double precision,
    voltage_v    double precision,
    current_a    double precision,
    energy_wh    double precision,
    power_factor double precision,
    frequency_hz double precision,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT power_measurements_key UNIQUE (time, customer_id, device_id)
) PARTITION BY RANGE (time);

CREATE TABLE fleet.power_measurements_default PARTITION OF fleet.power_measurements DEFAULT;

CREATE FUNCTION fleet.week_start(ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT
    RETURN date_trunc('week', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';

-- Makes the weekly partitions covering [p_from, p_to). Rows already sitting in the
-- default partition for a new week are moved into it in the same transaction.
CREATE FUNCTION fleet.ensure_measurement_partitions(p_from timestamptz, p_to timestamptz)
    RETURNS integer
    LANGUAGE plpgsql
AS $$
DECLARE
    w       timestamptz := fleet.week_start(p_from);
    pname   text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet.ensure_measurement_partitions'));
    WHILE w < p_to LOOP
        pname := 'power_measurements_' || to_char(w AT TIME ZONE 'UTC', 'YYYYMMDD');
        -- weeks before archive_end belong to the archive partition
        IF w >= (SELECT archive_end FROM fleet.partition_settings)
           AND to_regclass(format('fleet.%I', pname)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE fleet.%I (LIKE fleet.power_measurements INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                pname);
            EXECUTE format(
                'WITH moved AS (DELETE FROM fleet.power_measurements_default '
                'WHERE time >= %L AND time < %L RETURNING *) INSERT INTO fleet.%I SELECT * FROM moved',
                w, w + interval '7 days', pname);
            EXECUTE format(
                'ALTER TABLE fleet.power_measurements ATTACH PARTITION fleet.%I FOR VALUES FROM (%L) TO (%L)',
                pname, w, w + interval '7 days');
            created := created + 1;
        END IF;
        w := w + interval '7 days';
    END LOOP;
    RETURN created;
END
$$;

CREATE TABLE fleet.partition_settings (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    archive_end timestamptz NOT NULL
);

DO $$
DECLARE
    archive_end timestamptz := fleet.week_start(now()) - interval '4 weeks';
BEGIN
    INSERT INTO fleet.partition_settings (archive_end) VALUES (archive_end);
    EXECUTE format(
        'CREATE TABLE fleet.power_measurements_archive PARTITION OF fleet.power_measurements '
        'FOR VALUES FROM (MINVALUE) TO (%L)', archive_end);
    PERFORM fleet.ensure_measurement_partitions(archive_end, now() + interval '8 weeks');
END
$$;
