-- fleet.ensure_measurement_partitions (002) stepped from week to week with
-- `+ interval '7 days'`, which PostgreSQL adds in the session's time zone: in a
-- session whose TimeZone keeps daylight saving (Europe/Berlin), a week across the
-- change is 167 or 169 hours, so the partitions after it began an hour off Monday
-- 00:00 UTC, were named after the wrong day, and the next run's weeks overlapped
-- them. Weeks are stepped in UTC now, whatever the session's time zone.
CREATE OR REPLACE FUNCTION fleet.ensure_measurement_partitions(p_from timestamptz, p_to timestamptz)
    RETURNS integer
    LANGUAGE plpgsql
    SET TimeZone = 'UTC'
AS $$
DECLARE
    w       timestamptz := fleet.week_start(p_from);
    w_end   timestamptz;
    pname   text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet.ensure_measurement_partitions'));
    WHILE w < p_to LOOP
        w_end := w + interval '168 hours';
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
                w, w_end, pname);
            EXECUTE format(
                'ALTER TABLE fleet.power_measurements ATTACH PARTITION fleet.%I FOR VALUES FROM (%L) TO (%L)',
                pname, w, w_end);
            created := created + 1;
        END IF;
        w := w_end;
    END LOOP;
    RETURN created;
END
$$;
