-- Makes the weekly partitions covering [p_from, p_to). Rows already sitting in the
-- default partition for a new week are moved into it in the same transaction.
-- Weeks are stepped in UTC whatever the session's time zone (`+ interval '7 days'`
-- is added in the session's zone, and a week across a daylight-saving change would
-- be 167 or 169 hours long).
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
