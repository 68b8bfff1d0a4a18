-- The batch is done: its ticket is handed back (a lease not handed back ends by itself).
CREATE OR REPLACE FUNCTION fleet.ingest_release(p_customer text, p_ticket timestamptz)
RETURNS void
LANGUAGE sql AS $$
    UPDATE fleet.ingest_admission SET held_until = array_remove(held_until, p_ticket) WHERE customer_id = p_customer;
$$;
