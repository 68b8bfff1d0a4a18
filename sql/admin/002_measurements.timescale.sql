-- TimescaleDB: power_measurements is a hypertable with 7-day chunks and the
-- columnstore segmented by (customer_id, device_id), newest first. Exactly one
-- unique constraint, which includes the segment-by columns, so ON CONFLICT DO
-- NOTHING into compressed chunks stays cheap. Policies are set by the bootstrap
-- (fleet.profiles), because their settings may change on a stack update.
CREATE EXTENSION IF NOT EXISTS timescaledb;

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
);

SELECT create_hypertable('fleet.power_measurements',
                         by_range('time', INTERVAL '7 days'),
                         if_not_exists => true);

ALTER TABLE fleet.power_measurements SET (
    timescaledb.enable_columnstore = true,
    timescaledb.segmentby = 'customer_id, device_id',
    timescaledb.orderby = 'time DESC'
);
