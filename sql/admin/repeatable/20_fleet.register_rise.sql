-- The rise of the register over readings in time order, within one hour:
-- fleet.register_rise(energy_wh ORDER BY time). NULL readings are skipped; NULL when
-- there is no reading. The readings are gathered by array_append (built in, in place)
-- and the rise is worked out once per hour by the final function: a state function
-- in SQL ran as a statement of its own for every reading (about 10 us each).
CREATE OR REPLACE AGGREGATE fleet.register_rise(float8) (
    SFUNC = array_append,
    STYPE = float8[],
    FINALFUNC = fleet.register_rise_final,
    PARALLEL = SAFE
);
