-- The final function of the aggregate fleet.register_rise (20_fleet.register_rise.sql):
-- the register's rise over readings in time order, NULL readings skipped.
CREATE OR REPLACE FUNCTION fleet.register_rise_final(readings float8[]) RETURNS float8
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    v      float8;
    before float8;
    total  float8;
BEGIN
    IF readings IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH v IN ARRAY readings LOOP
        CONTINUE WHEN v IS NULL;
        total := CASE WHEN before IS NULL THEN 0 ELSE fleet.energy_add(total, fleet.energy_rise(before, v)) END;
        before := v;
    END LOOP;
    RETURN total;
END
$$;
