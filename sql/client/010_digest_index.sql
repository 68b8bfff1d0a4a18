-- Reconciliation digests read one UTC day of the portal's measurements at a time
-- (every device of the day, or a few): an index on time serves both, where the
-- cursor's index (push_xid first) cannot. A portal that already has an index
-- leading with time keeps it and gets no second one.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'monitoring.power_measurements'::regclass
          AND a.attname = 'time'
          AND i.indpred IS NULL
    ) THEN
        CREATE INDEX power_measurements_time_idx ON monitoring.power_measurements (time, device_id);
    END IF;
END
$$;
