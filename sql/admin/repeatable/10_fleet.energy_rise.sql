-- The arithmetic of hourly energy, shared by both profiles (shared DESIGN.md, Admin
-- database, energy_wh). power_measurements.energy_wh is a cumulative register:
--
-- * The rise from one reading a to the next b is b - a; a register that goes down
--   restarted (or the meter was replaced), and b counts from zero: the rise is b
--   (never below 0, so no hour is ever negative).
-- * The rise between two readings is spread evenly over the time between them, so
--   every hour boundary is interpolated between the last reading before it and the
--   first one after it, and over any span of whole hours the hours add up to the
--   register's rise.
--
-- Every step stays finite for any finite double (the ingest must never fail on a
-- value it accepted): sums are capped at the largest double, and products that
-- could underflow (PostgreSQL raises an error where C would give 0) are 0 instead.
-- The amounts below 1e-290 Wh that this drops are far under any meter's resolution.

-- The register's rise from reading a to the next reading b. NULL if either is NULL.
CREATE OR REPLACE FUNCTION fleet.energy_rise(a float8, b float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN a IS NULL OR b IS NULL THEN NULL
                WHEN b < a THEN greatest(b, 0)
                -- b - a overflows only when a is negative
                WHEN a < 0 AND b > 1.7976931348623157e308 + a THEN 1.7976931348623157e308
                ELSE b - a END;
