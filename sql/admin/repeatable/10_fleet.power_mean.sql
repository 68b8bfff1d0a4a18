-- The mean power of an hour from its sum kept scaled by 2^-40 (fleet.power_scaled),
-- clamped so that the product stays finite.
CREATE OR REPLACE FUNCTION fleet.power_mean(scaled_sum float8, samples bigint) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN samples IS NULL OR samples = 0 THEN NULL
                WHEN abs(scaled_sum) < 1e-270 THEN 0
                ELSE least(greatest(scaled_sum / samples, -1.6349923815708423e296), 1.6349923815708423e296)
                     * 1099511627776 END;
