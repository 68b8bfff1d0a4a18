-- The postgres profile's weekly partitions are stepped in UTC from here on; the
-- timescale profile has no such function (TimescaleDB makes its chunks itself).
SELECT 1;
