-- fleet.hourly_per_device, the same in both profiles: each hour's energy from its own
-- state (fleet.hourly_state: a table kept by the ingest, or the continuous aggregate)
-- and the neighbouring hours' readings, by the arithmetic of 10_fleet.energy_rise.sql.
--
-- An hour with register readings: the register's rise inside it (first to last
-- reading), plus its share of the rise from the last reading before it (interpolated
-- at its start) and of the rise to the first reading after it (interpolated at its
-- end). A reading exactly on a boundary belongs to the hour it starts.
--
-- Hours between readings of a register that have none themselves (the meter was
-- offline, or only sent NULL registers) get their even share of the rise across the
-- gap: 3600 s / the seconds between the two readings. A gap hour with no row at all
-- appears here with sample_count 0 and no power figures, so that the hours still add
-- up to the register's rise over any span of whole hours. An hour with no register
-- reading that no two readings bracket (before a device's first, after its last)
-- has energy_wh NULL. The rise after the last reading is not known yet: until the
-- next reading arrives, the last hour holds only what it has seen.
--
-- Filters on customer_id and device_id reach fleet.hourly_state (they are the
-- windows' partitions); a device's hours are read in order of the state's key.
CREATE OR REPLACE VIEW fleet.hourly_per_device AS
SELECT x.bucket,
       h.customer_id,
       h.device_id,
       x.sample_count,
       x.avg_power_w,
       x.min_power_w,
       x.max_power_w,
       x.energy_wh
FROM (
    SELECT s.*,
           extract(epoch FROM s.first_time - s.bucket)::float8 AS first_s,
           extract(epoch FROM s.bucket + interval '1 hour' - s.last_time)::float8 AS last_s,
           extract(epoch FROM s.last_time)::float8 AS last_epoch,
           lag(s.bucket) OVER w AS prev_bucket,
           -- {epoch, value} of the last register reading before this hour
           max(CASE WHEN s.last_time IS NOT NULL
                    THEN ARRAY[extract(epoch FROM s.last_time)::float8, s.last_energy_wh] END)
               OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before,
           -- {epoch, value} of the first register reading after this hour
           min(CASE WHEN s.first_time IS NOT NULL
                    THEN ARRAY[extract(epoch FROM s.first_time)::float8, s.first_energy_wh] END)
               OVER (PARTITION BY s.customer_id, s.device_id ORDER BY s.bucket DESC
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS after,
           CASE WHEN s.first_time IS NOT NULL
                THEN ARRAY[extract(epoch FROM s.first_time)::float8, s.first_energy_wh] END AS own_first
    FROM fleet.hourly_state s
    WINDOW w AS (PARTITION BY s.customer_id, s.device_id ORDER BY s.bucket)
) AS h
CROSS JOIN LATERAL (
    SELECT h.bucket,
           h.sample_count,
           fleet.power_mean(h.power_sum, h.power_samples) AS avg_power_w,
           h.min_power_w,
           h.max_power_w,
           CASE WHEN h.first_time IS NULL THEN
                    fleet.energy_share(fleet.energy_rise(h.before[2], h.after[2]), 3600, h.after[1] - h.before[1])
                ELSE fleet.energy_add(
                    fleet.energy_add(
                        coalesce(fleet.energy_share(fleet.energy_rise(h.before[2], h.first_energy_wh),
                                                    h.first_s, h.own_first[1] - h.before[1]), 0),
                        h.inner_wh),
                    coalesce(fleet.energy_share(fleet.energy_rise(h.last_energy_wh, h.after[2]),
                                                h.last_s, h.after[1] - h.last_epoch), 0))
           END AS energy_wh
    UNION ALL
    SELECT g.bucket, 0, NULL, NULL, NULL,
           fleet.energy_share(fleet.energy_rise(h.before[2], (coalesce(h.own_first, h.after))[2]), 3600,
                              (coalesce(h.own_first, h.after))[1] - h.before[1])
    FROM generate_series(h.prev_bucket + interval '1 hour', h.bucket - interval '1 hour', interval '1 hour') AS g(bucket)
    WHERE h.prev_bucket < h.bucket - interval '1 hour'
      AND h.before IS NOT NULL
      AND coalesce(h.own_first, h.after) IS NOT NULL
) AS x;
