-- Reconciliation: per customer, device and UTC day, the last comparison of the
-- portal's digest (sent by the push as a `digests` batch) with the Admin's own
-- digest of fleet.power_measurements (fleet/reconcile.py defines both).
CREATE TABLE fleet.reconciliation (
    customer_id    text NOT NULL REFERENCES fleet.customers (id),
    device_id      text NOT NULL CHECK (length(device_id) BETWEEN 1 AND 64),
    day            date NOT NULL,
    portal_count   bigint NOT NULL CHECK (portal_count >= 0),
    portal_hash    text NOT NULL,
    admin_count    bigint NOT NULL CHECK (admin_count >= 0),
    admin_hash     text NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('matched', 'missing', 'extra', 'differs')),
    checked_at     timestamptz NOT NULL DEFAULT now(),
    -- the first check of the current run of mismatches (NULL once matched)
    mismatch_since timestamptz,
    PRIMARY KEY (customer_id, device_id, day)
);

-- "verified through <day>" per customer
CREATE INDEX reconciliation_day_idx ON fleet.reconciliation (customer_id, day);
-- the open mismatches
CREATE INDEX reconciliation_open_idx ON fleet.reconciliation (customer_id, day)
    WHERE outcome <> 'matched';
