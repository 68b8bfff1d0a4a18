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
CREATE FUNCTION fleet.energy_rise(a float8, b float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN a IS NULL OR b IS NULL THEN NULL
                WHEN b < a THEN greatest(b, 0)
                -- b - a overflows only when a is negative
                WHEN a < 0 AND b > 1.7976931348623157e308 + a THEN 1.7976931348623157e308
                ELSE b - a END;

-- a + b for a, b >= 0, capped at the largest double.
CREATE FUNCTION fleet.energy_add(a float8, b float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN a > 1.7976931348623157e308 - b THEN 1.7976931348623157e308 ELSE a + b END;

-- The part of a rise that falls in a stretch of time: rise * part / whole, for
-- 0 <= part <= whole (seconds).
CREATE FUNCTION fleet.energy_share(rise float8, part float8, whole float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN rise IS NULL THEN NULL
                WHEN part <= 0 OR rise < 1e-290 THEN 0
                WHEN part >= whole THEN rise
                ELSE rise * (part / whole) END;

-- Power sums are kept scaled by 2^-40, so that no count of finite readings an hour
-- can hold overflows them (each term is at most 1.6e296); fleet.power_mean undoes it.
CREATE FUNCTION fleet.power_scaled(p float8) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN abs(p) < 1e-290 THEN 0 ELSE p * 9.094947017729282e-13 END;

CREATE FUNCTION fleet.power_mean(scaled_sum float8, samples bigint) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN samples IS NULL OR samples = 0 THEN NULL
                WHEN abs(scaled_sum) < 1e-270 THEN 0
                ELSE least(greatest(scaled_sum / samples, -1.6349923815708423e296), 1.6349923815708423e296)
                     * 1099511627776 END;

-- The rise of the register over readings in time order, within one hour:
-- fleet.register_rise(energy_wh ORDER BY time). NULL readings are skipped; NULL when
-- there is no reading. The readings are gathered by array_append (built in, in place)
-- and the rise is worked out once per hour by the final function: a state function
-- in SQL ran as a statement of its own for every reading (about 10 us each).
CREATE FUNCTION fleet.register_rise_final(readings float8[]) RETURNS float8
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

CREATE AGGREGATE fleet.register_rise(float8) (
    SFUNC = array_append,
    STYPE = float8[],
    FINALFUNC = fleet.register_rise_final,
    PARALLEL = SAFE
);
