-- The maintenance's rebuild of [p_from, p_to) (whole hours) from the stored rows.
-- It waits for the ingests in flight (they hold the lock shared while a rebuild is
-- queued) and holds them off until it commits, so that no batch merges into an hour
-- while the hour is being rewritten from a snapshot that does not hold the batch.
CREATE OR REPLACE FUNCTION fleet.hourly_state_rebuild(p_from timestamptz, p_to timestamptz)
    RETURNS bigint
    LANGUAGE plpgsql
    SET jit = off  -- as fleet.insert_measurements: a step holds the ingest off
AS $$
DECLARE
    v_from timestamptz := date_bin('1 hour', p_from, '2000-01-01 00:00:00+00');
    v_to   timestamptz := date_bin('1 hour', p_to - interval '1 microsecond', '2000-01-01 00:00:00+00')
                          + interval '1 hour';
    v_rows bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet.hourly_state'));
    WITH up AS (
        INSERT INTO fleet.hourly_state AS s
            (customer_id, device_id, bucket, sample_count, power_samples, power_sum, min_power_w, max_power_w,
             first_time, first_energy_wh, last_time, last_energy_wh, inner_wh)
        SELECT m.customer_id, m.device_id, date_bin('1 hour', m.time, '2000-01-01 00:00:00+00'),
               count(*), count(m.power_w), sum(fleet.power_scaled(m.power_w)), min(m.power_w), max(m.power_w),
               min(m.time) FILTER (WHERE m.energy_wh IS NOT NULL),
               (array_agg(m.energy_wh ORDER BY m.time) FILTER (WHERE m.energy_wh IS NOT NULL))[1],
               max(m.time) FILTER (WHERE m.energy_wh IS NOT NULL),
               (array_agg(m.energy_wh ORDER BY m.time DESC) FILTER (WHERE m.energy_wh IS NOT NULL))[1],
               fleet.register_rise(m.energy_wh ORDER BY m.time)
        FROM fleet.power_measurements m
        WHERE m.time >= v_from AND m.time < v_to
        GROUP BY 1, 2, 3
        ORDER BY 1, 2, 3
        ON CONFLICT (customer_id, device_id, bucket) DO UPDATE SET
            sample_count = excluded.sample_count, power_samples = excluded.power_samples,
            power_sum = excluded.power_sum, min_power_w = excluded.min_power_w,
            max_power_w = excluded.max_power_w, first_time = excluded.first_time,
            first_energy_wh = excluded.first_energy_wh, last_time = excluded.last_time,
            last_energy_wh = excluded.last_energy_wh, inner_wh = excluded.inner_wh
        RETURNING 1
    )
    SELECT count(*) INTO v_rows FROM up;
    RETURN v_rows;
END
$$;
