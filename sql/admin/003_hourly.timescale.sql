-- TimescaleDB: a real-time continuous aggregate. Created WITH NO DATA because a
-- migration runs inside a transaction; the refresh policy is set by the bootstrap.
CREATE MATERIALIZED VIEW fleet.hourly_per_device
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       customer_id,
       device_id,
       count(*) AS sample_count,
       avg(power_w) AS avg_power_w,
       min(power_w) AS min_power_w,
       max(power_w) AS max_power_w,
       max(energy_wh) - min(energy_wh) AS energy_wh
FROM fleet.power_measurements
GROUP BY 1, 2, 3
WITH NO DATA;
