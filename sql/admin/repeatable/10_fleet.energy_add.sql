-- a + b for a, b >= 0, capped at the largest double (the arithmetic of hourly
-- energy: 10_fleet.energy_rise.sql).
CREATE OR REPLACE FUNCTION fleet.energy_add(a float8, b float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN a > 1.7976931348623157e308 - b THEN 1.7976931348623157e308 ELSE a + b END;
