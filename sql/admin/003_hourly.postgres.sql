-- Aurora / plain PostgreSQL: the hourly rollup is kept current inside the ingest
-- transaction from the rows actually inserted (exact by construction). The view
-- has the same columns as the TimescaleDB continuous aggregate.
CREATE TABLE fleet.hourly_rollup (
    bucket        timestamptz NOT NULL,
    customer_id   text NOT NULL,
    device_id     text NOT NULL,
    sample_count  bigint NOT NULL,
    power_samples bigint NOT NULL,
    sum_power_w   double precision,
    min_power_w   double precision,
    max_power_w   double precision,
    min_energy_wh double precision,
    max_energy_wh double precision,
    PRIMARY KEY (bucket, customer_id, device_id)
);

CREATE VIEW fleet.hourly_per_device AS
SELECT bucket,
       customer_id,
       device_id,
       sample_count,
       sum_power_w / NULLIF(power_samples, 0) AS avg_power_w,
       min_power_w,
       max_power_w,
       max_energy_wh - min_energy_wh AS energy_wh
FROM fleet.hourly_rollup;
