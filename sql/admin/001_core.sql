-- Admin database: customers, their tokens, the client's sites and devices, the
-- per-batch audit trail and the quarantine for rejected items. Shared by both
-- database profiles; power_measurements and the hourly view come per profile.
CREATE SCHEMA IF NOT EXISTS fleet;

CREATE TABLE fleet.customers (
    id            text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    first_seen_at timestamptz,
    last_seen_at  timestamptz
);

-- Only the SHA-256 of a token is stored; several live tokens per customer allow
-- rotation without downtime. The primary key is the lookup index.
CREATE TABLE fleet.customer_tokens (
    token_sha256 bytea PRIMARY KEY CHECK (length(token_sha256) = 32),
    customer_id  text NOT NULL REFERENCES fleet.customers (id),
    token_hint   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX customer_tokens_customer_idx ON fleet.customer_tokens (customer_id);

-- No foreign key from devices to sites: batches of different types may arrive in
-- any order, and a device is never refused because its site came later.
CREATE TABLE fleet.sites (
    customer_id text NOT NULL REFERENCES fleet.customers (id),
    id          text NOT NULL CHECK (length(id) BETWEEN 1 AND 64),
    name        text NOT NULL,
    timezone    text,
    latitude    double precision,
    longitude   double precision,
    updated_at  timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, id)
);

CREATE TABLE fleet.devices (
    customer_id      text NOT NULL REFERENCES fleet.customers (id),
    id               text NOT NULL CHECK (length(id) BETWEEN 1 AND 64),
    site_id          text NOT NULL CHECK (length(site_id) BETWEEN 1 AND 64),
    name             text NOT NULL,
    model            text,
    firmware_version text,
    updated_at       timestamptz,
    received_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, id)
);

-- One row per batch, also for batches refused after the customer was known.
CREATE TABLE fleet.ingest_events (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id        text NOT NULL REFERENCES fleet.customers (id),
    batch_type         text,
    batch_id           uuid,
    received_at        timestamptz NOT NULL DEFAULT now(),
    accepted           integer NOT NULL DEFAULT 0,
    duplicates         integer NOT NULL DEFAULT 0,
    rejected           integer NOT NULL DEFAULT 0,
    bytes              bigint NOT NULL DEFAULT 0,
    decompressed_bytes bigint,
    client_cursor      text,
    min_time           timestamptz,
    max_time           timestamptz,
    duration_ms        double precision,
    status             smallint NOT NULL,
    error              text
);
CREATE INDEX ingest_events_customer_idx ON fleet.ingest_events (customer_id, received_at DESC);
-- The ledger: the last acknowledged cursor per customer and batch type.
CREATE INDEX ingest_events_ledger_idx ON fleet.ingest_events (customer_id, batch_type, id DESC)
    WHERE status = 200;
CREATE INDEX ingest_events_batch_idx ON fleet.ingest_events (customer_id, batch_id)
    WHERE batch_id IS NOT NULL;

-- Items the ingest refused, kept with the reason so nothing a client sent is lost.
CREATE TABLE fleet.quarantine (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ingest_event_id bigint NOT NULL REFERENCES fleet.ingest_events (id),
    customer_id     text NOT NULL REFERENCES fleet.customers (id),
    batch_type      text,
    item_index      integer,
    reason          text NOT NULL,
    payload         text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quarantine_customer_idx ON fleet.quarantine (customer_id, received_at DESC);

-- Time ranges whose hourly aggregate must be refreshed (TimescaleDB profile:
-- back-filled rows older than the refresh policy's window).
CREATE TABLE fleet.hourly_refresh_queue (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    range_start  timestamptz NOT NULL,
    range_end    timestamptz NOT NULL CHECK (range_end > range_start),
    requested_at timestamptz NOT NULL DEFAULT now()
);
