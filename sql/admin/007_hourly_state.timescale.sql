-- TimescaleDB: hourly energy by the definition of 006_energy.sql.
--
-- The continuous aggregate keeps what a bucket alone can know: its counts and power
-- figures, its first and last register reading and the register's rise between them
-- (an ordered aggregate over the bucket's rows). The energy of an hour also needs
-- the last reading before it and the first after it, which live in other buckets:
-- the view fleet.hourly_per_device (008_hourly_view.sql) takes them from the
-- neighbouring buckets at read time, so refreshing the buckets a back-filled reading
-- lands in brings the hours on both sides of it up to date as well.
--
-- It replaces the aggregate of 003, whose max - min was not the energy of the hour.
-- Existing deployments: dropping it and creating this one WITH NO DATA is quick and
-- reads no row; the history is queued in fleet.hourly_refresh_queue, a day a row, and
-- the maintenance refreshes it in bounded steps (refresh_continuous_aggregate does
-- not block inserts). The bootstrap adds this aggregate's refresh policy; the old
-- one went with the old aggregate.
DROP MATERIALIZED VIEW fleet.hourly_per_device;

CREATE MATERIALIZED VIEW fleet.hourly_state
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       customer_id,
       device_id,
       count(*) AS sample_count,
       count(power_w) AS power_samples,
       sum(fleet.power_scaled(power_w)) AS power_sum,
       min(power_w) AS min_power_w,
       max(power_w) AS max_power_w,
       min(time) FILTER (WHERE energy_wh IS NOT NULL) AS first_time,
       first(energy_wh, time) FILTER (WHERE energy_wh IS NOT NULL) AS first_energy_wh,
       max(time) FILTER (WHERE energy_wh IS NOT NULL) AS last_time,
       last(energy_wh, time) FILTER (WHERE energy_wh IS NOT NULL) AS last_energy_wh,
       fleet.register_rise(energy_wh ORDER BY time) AS inner_wh
FROM fleet.power_measurements
GROUP BY 1, 2, 3
WITH NO DATA;

INSERT INTO fleet.hourly_refresh_queue (range_start, range_end)
SELECT d, d + interval '1 day'
FROM (SELECT min(time) AS lo, max(time) AS hi FROM fleet.power_measurements) AS b,
     generate_series(date_trunc('day', b.lo, 'UTC'), b.hi, interval '1 day') AS d
WHERE b.lo IS NOT NULL;
