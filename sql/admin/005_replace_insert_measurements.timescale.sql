-- fleet.insert_measurements (004), written once and faster:
--
-- * One statement for both attempts. A batch seen for the first time inserts without
--   the speculative insertion of ON CONFLICT (a third of the statement's cost, by the
--   benchmark); the first duplicate aborts it (a subtransaction, rolled back) and the
--   batch goes again with ON CONFLICT DO NOTHING, which keeps what is stored. The
--   conflict clause is the only difference, so the statement is one text run by
--   EXECUTE and planned at each call: 0.15 ms of planning in a ~27 ms batch, against
--   two copies of it for the plan PL/pgSQL would keep.
-- * Rows from unnest in the select list, which yields them as it reads the arrays (a
--   ProjectSet node); unnest in FROM first copies each of the eight arrays into a
--   tuplestore of its own: about 2 ms of a 5,000-row batch (bench/README.md). The
--   arrays are equally long (the ingest builds them from one list of items), and
--   select-list set-returning functions run in lockstep, so the rows are the same.
-- * Rows sorted so that two batches lock their keys in the same order; any order
--   every session shares will do, and bytes ("C") compare fastest: a database's own
--   collation (en_US.UTF-8 on Aurora) goes through the locale, which took 0.7 ms more
--   a batch with ICU's en-US, measured on 5,000 rows in random order.
-- The continuous aggregate follows by itself (the ingest queues refreshes for
-- back-filled ranges older than its refresh window).
CREATE OR REPLACE FUNCTION fleet.insert_measurements(
    p_customer text,
    p_time timestamptz[],
    p_device text[],
    p_power float8[],
    p_voltage float8[],
    p_current float8[],
    p_energy float8[],
    p_power_factor float8[],
    p_frequency float8[],
    OUT accepted bigint,
    OUT min_time timestamptz,
    OUT max_time timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
    -- $1 the customer, $2 to $9 the columns; %s the conflict clause.
    insert_rows CONSTANT text := $sql$
        WITH ins AS (
            INSERT INTO fleet.power_measurements
                (time, customer_id, device_id, power_w, voltage_v, current_a, energy_wh, power_factor, frequency_hz)
            SELECT u.t, $1, u.d, u.p, u.v, u.c, u.e, u.pf, u.f
            FROM (SELECT unnest($2) AS t, unnest($3) AS d, unnest($4) AS p, unnest($5) AS v,
                         unnest($6) AS c, unnest($7) AS e, unnest($8) AS pf, unnest($9) AS f) AS u
            ORDER BY u.t, u.d COLLATE "C"
            %s
            RETURNING time
        )
        SELECT count(*), min(ins.time), max(ins.time) FROM ins
    $sql$;
BEGIN
    BEGIN
        EXECUTE format(insert_rows, '') INTO accepted, min_time, max_time
            USING p_customer, p_time, p_device, p_power, p_voltage, p_current, p_energy, p_power_factor, p_frequency;
        RETURN;
    EXCEPTION WHEN unique_violation THEN
        NULL;
    END;
    EXECUTE format(insert_rows, 'ON CONFLICT (time, customer_id, device_id) DO NOTHING')
        INTO accepted, min_time, max_time
        USING p_customer, p_time, p_device, p_power, p_voltage, p_current, p_energy, p_power_factor, p_frequency;
END
$$;
