-- Load shedding of the ingest, per customer: the batches each customer has in
-- flight (their leases' ends), admitted by fleet.ingest_admit. A customer's row is
-- its own lock, so one customer's admissions never wait for another's; the total
-- over all customers is counted without a lock (a soft bound, by a batch or two).
CREATE TABLE fleet.ingest_admission (
    customer_id text PRIMARY KEY REFERENCES fleet.customers (id),
    held_until  timestamptz[] NOT NULL DEFAULT '{}',
    admitted_at timestamptz
);

-- A ticket (the end of its lease) or NULL: the customer has p_per_customer batches
-- in flight, or the server has p_total. A quarter of the total (at least one) is
-- kept for customers that were admitted nothing for p_fresh_ms (live data, a batch
-- or two a minute), so that many customers back-filling at once, batch after batch,
-- never starve the others.
CREATE FUNCTION fleet.ingest_admit(
    p_customer text, p_per_customer int, p_total int, p_lease_ms int, p_fresh_ms int
)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    now_    timestamptz := clock_timestamp();
    held    timestamptz[];
    live    timestamptz[];
    busy    bigint;
    room    int;
    last    timestamptz;
    ticket  timestamptz;
BEGIN
    INSERT INTO fleet.ingest_admission (customer_id) VALUES (p_customer) ON CONFLICT DO NOTHING;
    SELECT held_until, admitted_at INTO held, last FROM fleet.ingest_admission
    WHERE customer_id = p_customer FOR UPDATE;
    live := ARRAY(SELECT t FROM unnest(held) t WHERE t > now_);
    IF cardinality(live) >= p_per_customer THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO busy FROM fleet.ingest_admission a, unnest(a.held_until) t WHERE t > now_;
    IF cardinality(live) = 0 AND (last IS NULL OR last < now_ - make_interval(secs => p_fresh_ms / 1000.0)) THEN
        room := p_total + greatest(1, p_total / 4);
    ELSE
        room := p_total;
    END IF;
    IF busy >= room THEN
        RETURN NULL;
    END IF;
    ticket := now_ + make_interval(secs => p_lease_ms / 1000.0);
    UPDATE fleet.ingest_admission SET held_until = live || ticket, admitted_at = now_ WHERE customer_id = p_customer;
    RETURN ticket;
END $$;

-- The batch is done: its ticket is handed back (a lease not handed back ends by itself).
CREATE FUNCTION fleet.ingest_release(p_customer text, p_ticket timestamptz)
RETURNS void
LANGUAGE sql AS $$
    UPDATE fleet.ingest_admission SET held_until = array_remove(held_until, p_ticket) WHERE customer_id = p_customer;
$$;
