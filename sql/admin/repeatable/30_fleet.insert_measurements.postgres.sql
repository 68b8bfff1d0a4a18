-- The measurement insert of the ingest (postgres profile), as a function so its plan
-- is prepared once per session inside PL/pgSQL (no SQL-level PREPARE, which would pin
-- an RDS Proxy session) and one call is one round trip. Rows arrive as arrays in
-- binary form, read by unnest in the select list (which yields them as it reads the
-- arrays; unnest in FROM first copies each array into a tuplestore of its own), sorted
-- so that two batches lock their keys in the same order (bytes, "C", compare fastest).
-- The statement stands twice: the two attempts differ only by the conflict clause,
-- but one text run by EXECUTE is planned at each call (1.3 ms more for a re-delivered
-- batch, bench/README.md).
--
-- The hourly state (fleet.hourly_state) grows in the same statement from exactly the
-- rows inserted. Per device-hour of the batch: counts and power, and from the readings
-- with a register value (in time order: one sort of the batch) the first, the last
-- and the rise between them. Merged into a stored hour, the rise stays exact when the
-- batch's readings all come after (or all before) the stored ones, the in-order case;
-- readings that fall between stored ones mark the hour ('NaN'), and the second
-- statement recomputes just those hours from their stored rows (an index range scan
-- of one hour). Nothing else of a device's history is read. Hours are UTC: date_bin on
-- a UTC origin equals date_trunc('hour', t, 'UTC') at half the cost.
CREATE OR REPLACE FUNCTION fleet.insert_measurements(
    p_customer text,
    p_time timestamptz[],
    p_device text[],
    p_power float8[],
    p_voltage float8[],
    p_current float8[],
    p_energy float8[],
    p_power_factor float8[],
    p_frequency float8[],
    OUT accepted bigint,
    OUT min_time timestamptz,
    OUT max_time timestamptz)
LANGUAGE plpgsql
-- The recompute's estimates grow with the table (its hour is a parameter): on a year
-- of history they passed jit_optimize_above_cost, and compiling took a second.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_devices text[];
    v_buckets timestamptz[];
    v_rises   float8[];
BEGIN
    -- While the upgrade's rebuild is queued, wait for (and hold off) a rebuild step.
    IF EXISTS (SELECT 1 FROM fleet.hourly_refresh_queue) THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext('fleet.hourly_state'));
    END IF;
    -- Fast path, as in 005: a plain INSERT, and ON CONFLICT DO NOTHING only after a
    -- duplicate aborted it. The statement stands twice for the kept plans (005).
    BEGIN
        WITH ins AS (
            INSERT INTO fleet.power_measurements
                (time, customer_id, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)
            SELECT u.t, p_customer, u.d, u.p, u.v, u.c, u.e, u.pf, u.f
            FROM (SELECT unnest(p_time) AS t, unnest(p_device) AS d, unnest(p_power) AS p, unnest(p_voltage) AS v,
                         unnest(p_current) AS c, unnest(p_energy) AS e, unnest(p_power_factor) AS pf,
                         unnest(p_frequency) AS f) AS u
            ORDER BY u.d COLLATE "C", u.t
            RETURNING time, device_id, power_w, energy_wh
        ), r AS (
            SELECT x.b, x.d, x.t, x.p, x.v, lag(x.v) OVER w AS pv, lead(x.v) OVER w AS nv
            FROM (SELECT date_bin('1 hour', ins.time, '2000-01-01 00:00:00+00') AS b, ins.device_id AS d,
                         ins.time AS t, ins.power_w AS p, ins.energy_wh AS v FROM ins) AS x
            WINDOW w AS (PARTITION BY x.d COLLATE "C", x.b, x.v IS NULL ORDER BY x.t)
        ), st AS (
            INSERT INTO fleet.hourly_state AS s
                (customer_id, device_id, bucket, sample_count, power_samples, power_sum, min_power_w, max_power_w,
                 first_time, first_energy_wh, last_time, last_energy_wh, inner_wh)
            SELECT p_customer, r.d, r.b, count(*), count(r.p), sum(fleet.power_scaled(r.p)), min(r.p), max(r.p),
                   min(r.t) FILTER (WHERE r.v IS NOT NULL), min(r.v) FILTER (WHERE r.pv IS NULL),
                   max(r.t) FILTER (WHERE r.v IS NOT NULL), min(r.v) FILTER (WHERE r.nv IS NULL),
                   CASE WHEN count(r.v) > 0 THEN
                       least(coalesce(sum(fleet.power_scaled(fleet.energy_rise(r.pv, r.v))), 0),
                             1.6349923815708423e296) * 1099511627776 END
            FROM r
            GROUP BY r.d, r.b
            ORDER BY r.d COLLATE "C", r.b
            ON CONFLICT (customer_id, device_id, bucket) DO UPDATE SET
                sample_count    = s.sample_count + excluded.sample_count,
                power_samples   = s.power_samples + excluded.power_samples,
                power_sum       = CASE WHEN s.power_sum IS NULL THEN excluded.power_sum
                                       WHEN excluded.power_sum IS NULL THEN s.power_sum
                                       ELSE s.power_sum + excluded.power_sum END,
                min_power_w     = LEAST(s.min_power_w, excluded.min_power_w),
                max_power_w     = GREATEST(s.max_power_w, excluded.max_power_w),
                first_time      = LEAST(s.first_time, excluded.first_time),
                first_energy_wh = CASE WHEN s.first_time IS NULL OR excluded.first_time < s.first_time
                                       THEN excluded.first_energy_wh ELSE s.first_energy_wh END,
                last_time       = GREATEST(s.last_time, excluded.last_time),
                last_energy_wh  = CASE WHEN s.last_time IS NULL OR excluded.last_time > s.last_time
                                       THEN excluded.last_energy_wh ELSE s.last_energy_wh END,
                inner_wh        = CASE WHEN excluded.first_time IS NULL THEN s.inner_wh
                                       WHEN s.first_time IS NULL THEN excluded.inner_wh
                                       WHEN excluded.first_time > s.last_time THEN fleet.energy_add(
                                           fleet.energy_add(s.inner_wh, excluded.inner_wh),
                                           fleet.energy_rise(s.last_energy_wh, excluded.first_energy_wh))
                                       WHEN excluded.last_time < s.first_time THEN fleet.energy_add(
                                           fleet.energy_add(s.inner_wh, excluded.inner_wh),
                                           fleet.energy_rise(excluded.last_energy_wh, s.first_energy_wh))
                                       ELSE 'NaN' END
            RETURNING s.device_id, s.bucket, s.inner_wh
        ), n AS (
            SELECT count(*) AS accepted, min(ins.time) AS lo, max(ins.time) AS hi FROM ins
        )
        SELECT n.accepted, n.lo, n.hi,
               array_agg(st.device_id) FILTER (WHERE st.inner_wh = 'NaN'),
               array_agg(st.bucket) FILTER (WHERE st.inner_wh = 'NaN')
        INTO accepted, min_time, max_time, v_devices, v_buckets
        FROM n LEFT JOIN st ON true
        GROUP BY n.accepted, n.lo, n.hi;
    EXCEPTION WHEN unique_violation THEN
        WITH ins AS (
            INSERT INTO fleet.power_measurements
                (time, customer_id, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)
            SELECT u.t, p_customer, u.d, u.p, u.v, u.c, u.e, u.pf, u.f
            FROM (SELECT unnest(p_time) AS t, unnest(p_device) AS d, unnest(p_power) AS p, unnest(p_voltage) AS v,
                         unnest(p_current) AS c, unnest(p_energy) AS e, unnest(p_power_factor) AS pf,
                         unnest(p_frequency) AS f) AS u
            ORDER BY u.d COLLATE "C", u.t
            ON CONFLICT (time, customer_id, device_id) DO NOTHING
            RETURNING time, device_id, power_w, energy_wh
        ), r AS (
            SELECT x.b, x.d, x.t, x.p, x.v, lag(x.v) OVER w AS pv, lead(x.v) OVER w AS nv
            FROM (SELECT date_bin('1 hour', ins.time, '2000-01-01 00:00:00+00') AS b, ins.device_id AS d,
                         ins.time AS t, ins.power_w AS p, ins.energy_wh AS v FROM ins) AS x
            WINDOW w AS (PARTITION BY x.d COLLATE "C", x.b, x.v IS NULL ORDER BY x.t)
        ), st AS (
            INSERT INTO fleet.hourly_state AS s
                (customer_id, device_id, bucket, sample_count, power_samples, power_sum, min_power_w, max_power_w,
                 first_time, first_energy_wh, last_time, last_energy_wh, inner_wh)
            SELECT p_customer, r.d, r.b, count(*), count(r.p), sum(fleet.power_scaled(r.p)), min(r.p), max(r.p),
                   min(r.t) FILTER (WHERE r.v IS NOT NULL), min(r.v) FILTER (WHERE r.pv IS NULL),
                   max(r.t) FILTER (WHERE r.v IS NOT NULL), min(r.v) FILTER (WHERE r.nv IS NULL),
                   CASE WHEN count(r.v) > 0 THEN
                       least(coalesce(sum(fleet.power_scaled(fleet.energy_rise(r.pv, r.v))), 0),
                             1.6349923815708423e296) * 1099511627776 END
            FROM r
            GROUP BY r.d, r.b
            ORDER BY r.d COLLATE "C", r.b
            ON CONFLICT (customer_id, device_id, bucket) DO UPDATE SET
                sample_count    = s.sample_count + excluded.sample_count,
                power_samples   = s.power_samples + excluded.power_samples,
                power_sum       = CASE WHEN s.power_sum IS NULL THEN excluded.power_sum
                                       WHEN excluded.power_sum IS NULL THEN s.power_sum
                                       ELSE s.power_sum + excluded.power_sum END,
                min_power_w     = LEAST(s.min_power_w, excluded.min_power_w),
                max_power_w     = GREATEST(s.max_power_w, excluded.max_power_w),
                first_time      = LEAST(s.first_time, excluded.first_time),
                first_energy_wh = CASE WHEN s.first_time IS NULL OR excluded.first_time < s.first_time
                                       THEN excluded.first_energy_wh ELSE s.first_energy_wh END,
                last_time       = GREATEST(s.last_time, excluded.last_time),
                last_energy_wh  = CASE WHEN s.last_time IS NULL OR excluded.last_time > s.last_time
                                       THEN excluded.last_energy_wh ELSE s.last_energy_wh END,
                inner_wh        = CASE WHEN excluded.first_time IS NULL THEN s.inner_wh
                                       WHEN s.first_time IS NULL THEN excluded.inner_wh
                                       WHEN excluded.first_time > s.last_time THEN fleet.energy_add(
                                           fleet.energy_add(s.inner_wh, excluded.inner_wh),
                                           fleet.energy_rise(s.last_energy_wh, excluded.first_energy_wh))
                                       WHEN excluded.last_time < s.first_time THEN fleet.energy_add(
                                           fleet.energy_add(s.inner_wh, excluded.inner_wh),
                                           fleet.energy_rise(excluded.last_energy_wh, s.first_energy_wh))
                                       ELSE 'NaN' END
            RETURNING s.device_id, s.bucket, s.inner_wh
        ), n AS (
            SELECT count(*) AS accepted, min(ins.time) AS lo, max(ins.time) AS hi FROM ins
        )
        SELECT n.accepted, n.lo, n.hi,
               array_agg(st.device_id) FILTER (WHERE st.inner_wh = 'NaN'),
               array_agg(st.bucket) FILTER (WHERE st.inner_wh = 'NaN')
        INTO accepted, min_time, max_time, v_devices, v_buckets
        FROM n LEFT JOIN st ON true
        GROUP BY n.accepted, n.lo, n.hi;
    END;
    IF v_devices IS NOT NULL THEN
        -- One index range scan per marked hour (the key leads with time) over the
        -- customer's rows, joined by hash to the marked device-hours.
        SELECT array_agg(q.d), array_agg(q.b), array_agg(q.rise)
        INTO v_devices, v_buckets, v_rises
        FROM (SELECT m.device_id AS d, h.b, fleet.register_rise(m.energy_wh ORDER BY m.time) AS rise
              FROM (SELECT DISTINCT b FROM unnest(v_buckets) AS b) AS h
              CROSS JOIN LATERAL (
                  SELECT m.time, m.device_id, m.energy_wh FROM fleet.power_measurements m
                  WHERE m.time >= h.b AND m.time < h.b + interval '1 hour' AND m.customer_id = p_customer
                  OFFSET 0) AS m  -- kept apart, so that it stays a range scan per hour
              JOIN unnest(v_devices, v_buckets) AS k(d, b) ON k.d = m.device_id AND k.b = h.b
              GROUP BY m.device_id, h.b) AS q;
        -- By key, one at a time: a join let the planner hash the customer's whole state.
        FOR i IN 1 .. cardinality(v_devices) LOOP
            UPDATE fleet.hourly_state SET inner_wh = v_rises[i]
            WHERE customer_id = p_customer AND device_id = v_devices[i] AND bucket = v_buckets[i];
        END LOOP;
    END IF;
END
$$;
