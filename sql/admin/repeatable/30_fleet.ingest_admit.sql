-- A ticket (the end of its lease) or NULL: the customer has p_per_customer batches
-- in flight, or the server has p_total. A quarter of the total (at least one) is
-- kept for customers that were admitted nothing for p_fresh_ms (live data, a batch
-- or two a minute), so that many customers back-filling at once, batch after batch,
-- never starve the others.
CREATE OR REPLACE FUNCTION fleet.ingest_admit(
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
