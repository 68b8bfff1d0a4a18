-- The part of a rise that falls in a stretch of time: rise * part / whole, for
-- 0 <= part <= whole (seconds). The arithmetic of hourly energy: 10_fleet.energy_rise.sql.
CREATE OR REPLACE FUNCTION fleet.energy_share(rise float8, part float8, whole float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN rise IS NULL THEN NULL
                WHEN part <= 0 OR rise < 1e-290 THEN 0
                WHEN part >= whole THEN rise
                ELSE rise * (part / whole) END;
