-- Power sums are kept scaled by 2^-40, so that no count of finite readings an hour
-- can hold overflows them (each term is at most 1.6e296); fleet.power_mean undoes it.
CREATE OR REPLACE FUNCTION fleet.power_scaled(p float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN abs(p) < 1e-290 THEN 0 ELSE p * 9.094947017729282e-13 END;
