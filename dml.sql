-- VPE warehouse loading and reading: the set-based merge from staging into the
-- star schema (load_staging) and the views people query. Only functions and
-- views live here, no data: re-applying is always safe.
--
-- How a load works (tasks/ingestion/load.py, one transaction):
--   COPY rows into staging.landslide_event and staging.weather_hourly with a
--   run_id, then SELECT * FROM load_staging(run_id). Every staged row of that
--   run ends up either in the star schema (new or already present) or in
--   rejected_rows with a reason; the run's staging rows are then deleted.

SET client_min_messages = warning;

BEGIN;

-- Views hold no data: they are rebuilt on every apply so that a changed
-- column list or type takes effect (CREATE OR REPLACE VIEW cannot do that).
-- No CASCADE: a view someone built on these stops the apply with an error
-- instead of vanishing.
DROP VIEW IF EXISTS training_days, event_weather_daily, window_weather_daily,
    staging.soil_candidate, staging.weather_candidate, staging.landslide_event_candidate;
DROP FUNCTION IF EXISTS staging.soil_depths;

-- Staged rows shaped like the star tables' columns (same names), so the
-- tables' own CHECK and NOT NULL constraints can be evaluated on them before
-- anything is inserted. Coordinates are rounded here as they are stored (they
-- are the location key); measurements stay double precision, which the
-- range checks compare directly and the insert rounds to the column's scale.

CREATE VIEW staging.landslide_event_candidate AS
SELECT s.ctid AS staging_ctid,
       s.run_id,
       s.source,
       s.row_number,
       nullif(btrim(s.event_id), '') AS catalog_id,
       s.event_date,
       s.event_time,
       nullif(btrim(s.time_text), '') AS time_text,
       (s.event_date + coalesce(s.event_time, time '00:00')) AT TIME ZONE 'UTC' AS instant,
       nullif(btrim(s.hazard_type), '') AS hazard_type,
       nullif(btrim(s.landslide_type), '') AS landslide_type,
       nullif(btrim(s.landslide_size), '') AS landslide_size,
       round(s.latitude::numeric, 6) AS latitude,
       round(s.longitude::numeric, 6) AS longitude,
       s.elevation,
       nullif(btrim(s.country), '') AS country,
       nullif(btrim(s.near), '') AS near,
       upper(nullif(btrim(s.continent_code), '')) AS continent_code
FROM staging.landslide_event s;

CREATE VIEW staging.weather_candidate AS
SELECT s.ctid AS staging_ctid,
       s.run_id,
       s.event_id,
       s.is_event,
       s.window_date,
       s.observed_at AS instant,
       round(s.latitude::numeric, 6) AS latitude,
       round(s.longitude::numeric, 6) AS longitude,
       s.elevation,
       s.temperature_2m,
       s.relative_humidity_2m,
       s.precipitation,
       s.rain,
       s.soil_temperature_0_to_7cm, s.soil_temperature_7_to_28cm,
       s.soil_temperature_28_to_100cm, s.soil_temperature_100_to_255cm,
       s.soil_moisture_0_to_7cm, s.soil_moisture_7_to_28cm,
       s.soil_moisture_28_to_100cm, s.soil_moisture_100_to_255cm
FROM staging.weather_hourly s;

-- The one place that knows how the API's eight soil columns map to depths.
-- A depth with neither value is no measurement, so it yields no row.
CREATE OR REPLACE FUNCTION staging.soil_depths(
    t0 double precision, t7 double precision, t28 double precision, t100 double precision,
    m0 double precision, m7 double precision, m28 double precision, m100 double precision)
RETURNS TABLE (depth_top_cm smallint, depth_bottom_cm smallint,
               temperature double precision, moisture double precision)
LANGUAGE sql IMMUTABLE AS $$
    SELECT d.top, d.bottom, d.temperature, d.moisture
    FROM (VALUES (0::smallint, 7::smallint, t0, m0), (7::smallint, 28::smallint, t7, m7),
                 (28::smallint, 100::smallint, t28, m28), (100::smallint, 255::smallint, t100, m100))
         AS d(top, bottom, temperature, moisture)
    WHERE d.temperature IS NOT NULL OR d.moisture IS NOT NULL
$$;

CREATE VIEW staging.soil_candidate AS
SELECT c.staging_ctid, c.run_id, d.*
FROM staging.weather_candidate c
CROSS JOIN LATERAL staging.soil_depths(
    c.soil_temperature_0_to_7cm, c.soil_temperature_7_to_28cm,
    c.soil_temperature_28_to_100cm, c.soil_temperature_100_to_255cm,
    c.soil_moisture_0_to_7cm, c.soil_moisture_7_to_28cm,
    c.soil_moisture_28_to_100cm, c.soil_moisture_100_to_255cm) d;

-- A SQL CASE expression naming the first constraint of p_target that a row of
-- p_rows breaks (NULL if none): NOT NULL columns the loader must supply and
-- CHECK constraints, for the columns p_rows has. Keys and foreign keys are
-- the merge's job (ON CONFLICT, lookups), not a row's fault.
CREATE OR REPLACE FUNCTION staging.constraint_violation_sql(p_target regclass, p_rows regclass)
RETURNS text LANGUAGE sql STABLE AS $$
    WITH target_column AS (
        SELECT a.attnum, a.attname, a.attnotnull, a.attidentity, a.attgenerated, a.atthasdef,
               EXISTS (SELECT 1 FROM pg_attribute r
                       WHERE r.attrelid = p_rows AND r.attname = a.attname
                         AND r.attnum > 0 AND NOT r.attisdropped) AS in_rows
        FROM pg_attribute a
        WHERE a.attrelid = p_target AND a.attnum > 0 AND NOT a.attisdropped
    ), foreign_key_column AS (
        SELECT unnest(conkey) AS attnum FROM pg_constraint WHERE conrelid = p_target AND contype = 'f'
    ), test AS (
        SELECT 1 AS kind, t.attname::text AS name,
               format('WHEN %I IS NULL THEN %L', t.attname,
                      format('%s is missing (%s.%s is NOT NULL)', t.attname, p_target, t.attname)) AS sql
        FROM target_column t
        WHERE t.attnotnull AND t.in_rows AND t.attidentity = '' AND t.attgenerated = ''
          AND NOT t.atthasdef AND t.attnum NOT IN (SELECT attnum FROM foreign_key_column)
        UNION ALL
        -- e.g. WHEN (...) IS FALSE THEN format('violates location_latitude_range (latitude=%s)', latitude)
        SELECT 2, c.conname::text,
               format('WHEN (%s) IS FALSE THEN format(%L, %s)', pg_get_expr(c.conbin, c.conrelid),
                      format('violates %s (%s)', c.conname, k.placeholders), k.arguments)
        FROM pg_constraint c
        CROSS JOIN LATERAL (
            SELECT string_agg(t.attname || '=%s', ', ' ORDER BY t.attnum) AS placeholders,
                   string_agg(quote_ident(t.attname), ', ' ORDER BY t.attnum) AS arguments
            FROM target_column t WHERE t.attnum = ANY (c.conkey)
        ) k
        WHERE c.conrelid = p_target AND c.contype = 'c'
          AND NOT EXISTS (SELECT 1 FROM unnest(c.conkey) k JOIN target_column t ON t.attnum = k
                          WHERE NOT t.in_rows OR t.attgenerated <> '')
    )
    SELECT coalesce('CASE ' || string_agg(sql, ' ' ORDER BY kind, name) || ' END', 'NULL::text')
    FROM test
$$;

-- Marks the run's rows of p_rows that break a constraint of one of p_targets
-- (checked in that order) as rejected in pg_temp.load_reject.
CREATE OR REPLACE FUNCTION staging.reject_violations(
    p_staging_table text, p_rows regclass, p_targets regclass[], p_run_id text,
    p_reason_prefix_sql text DEFAULT $$''$$)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    checks text;
BEGIN
    SELECT string_agg(staging.constraint_violation_sql(t, p_rows), ', ' ORDER BY n)
    INTO checks FROM unnest(p_targets) WITH ORDINALITY AS u(t, n);
    EXECUTE format($sql$
        INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
        SELECT %L, staging_ctid, %s || reason
        FROM (SELECT *, coalesce(%s) AS reason FROM %s WHERE run_id = $1) AS r
        WHERE reason IS NOT NULL
        ON CONFLICT DO NOTHING$sql$, p_staging_table, p_reason_prefix_sql, checks, p_rows)
    USING p_run_id;
END $$;

-- Adds to the counts load_staging returns.
CREATE OR REPLACE FUNCTION staging.count_load(
    p_target text, p_items bigint, p_inserted bigint, p_rejected bigint DEFAULT 0)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pg_temp.load_count AS c (target, items, inserted, rejected)
    VALUES (p_target, p_items, p_inserted, p_rejected)
    ON CONFLICT (target) DO UPDATE
    SET items = c.items + excluded.items, inserted = c.inserted + excluded.inserted,
        rejected = c.rejected + excluded.rejected;
END $$;

-- Inserts the places in pg_temp.load_place (one row per coordinate pair) and
-- fills gaps (elevation, country, ...) in places already known; never
-- overwrites a stored value.
CREATE OR REPLACE FUNCTION staging.merge_locations() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_new bigint;
BEGIN
    INSERT INTO location (latitude, longitude, elevation, country, near, continent_code)
    SELECT latitude, longitude, elevation, country, near, continent_code FROM pg_temp.load_place
    ON CONFLICT (latitude, longitude) DO NOTHING;
    GET DIAGNOSTICS n_new = ROW_COUNT;

    UPDATE location l
    SET elevation = coalesce(l.elevation, p.elevation), country = coalesce(l.country, p.country),
        near = coalesce(l.near, p.near), continent_code = coalesce(l.continent_code, p.continent_code)
    FROM pg_temp.load_place p
    WHERE l.latitude = p.latitude AND l.longitude = p.longitude
      AND ((l.elevation IS NULL AND p.elevation IS NOT NULL) OR (l.country IS NULL AND p.country IS NOT NULL)
           OR (l.near IS NULL AND p.near IS NOT NULL)
           OR (l.continent_code IS NULL AND p.continent_code IS NOT NULL));

    PERFORM staging.count_load('location', (SELECT count(*) FROM pg_temp.load_place), n_new);
    TRUNCATE pg_temp.load_place;
END $$;

CREATE OR REPLACE FUNCTION staging.merge_instants() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_new bigint;
BEGIN
    INSERT INTO datetime (instant) SELECT instant FROM pg_temp.load_instant
    ON CONFLICT (instant) DO NOTHING;
    GET DIAGNOSTICS n_new = ROW_COUNT;
    PERFORM staging.count_load('datetime', (SELECT count(*) FROM pg_temp.load_instant), n_new);
    TRUNCATE pg_temp.load_instant;
END $$;

-- Catalog rows of one run -> location, datetime, landslide_event.
CREATE OR REPLACE FUNCTION staging.merge_events(p_run_id text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_items bigint;
    n_new bigint;
    n_rejected bigint;
BEGIN
    PERFORM staging.reject_violations('landslide_event', 'staging.landslide_event_candidate',
                                      '{landslide_event,location,datetime}', p_run_id);

    -- A catalog id twice in one batch: the first row counts.
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'landslide_event', staging_ctid, format('repeats event_id %s of row %s', catalog_id, first_row)
    FROM (SELECT c.staging_ctid, c.catalog_id,
                 row_number() OVER w AS nth, first_value(c.row_number) OVER w AS first_row
          FROM staging.landslide_event_candidate c
          WHERE c.run_id = p_run_id
            AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                            WHERE r.staging_table = 'landslide_event' AND r.staging_ctid = c.staging_ctid)
          WINDOW w AS (PARTITION BY c.catalog_id ORDER BY c.row_number, c.staging_ctid)) d
    WHERE nth > 1
    ON CONFLICT DO NOTHING;

    -- A stored event is never silently replaced: a changed catalog row is shown.
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'landslide_event', c.staging_ctid,
           format('event_id %s is already loaded with other values (the first load is kept)', c.catalog_id)
    FROM staging.landslide_event_candidate c
    JOIN landslide_event e ON e.catalog_id = c.catalog_id
    JOIN location l ON l.location_id = e.location_id
    WHERE c.run_id = p_run_id
      AND (c.event_date, c.event_time, c.time_text, c.latitude, c.longitude,
           c.hazard_type, c.landslide_type, c.landslide_size)
          IS DISTINCT FROM (e.event_date, e.event_time, e.time_text, l.latitude, l.longitude,
                            e.hazard_type, e.landslide_type, e.landslide_size)
    ON CONFLICT DO NOTHING;

    INSERT INTO rejected_rows (source, row_key, raw, reason, run_id)
    SELECT coalesce(s.source, 'landslide catalog'),
           coalesce(nullif(concat_ws(' ', 'event_id ' || s.event_id, 'row ' || s.row_number), ''), 'unidentified row'),
           to_jsonb(s) - 'run_id', r.reason, s.run_id
    FROM staging.landslide_event s
    JOIN pg_temp.load_reject r ON r.staging_table = 'landslide_event' AND r.staging_ctid = s.ctid
    ON CONFLICT (source, row_key, reason) DO NOTHING;
    SELECT count(*) INTO n_rejected FROM pg_temp.load_reject WHERE staging_table = 'landslide_event';

    DROP TABLE IF EXISTS pg_temp.load_event;
    CREATE TEMP TABLE load_event ON COMMIT DROP AS
    SELECT c.* FROM staging.landslide_event_candidate c
    WHERE c.run_id = p_run_id
      AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                      WHERE r.staging_table = 'landslide_event' AND r.staging_ctid = c.staging_ctid);

    -- Several events at one place: the first catalog row describes the place.
    INSERT INTO pg_temp.load_place
    SELECT DISTINCT ON (latitude, longitude) latitude, longitude, elevation, country, near, continent_code
    FROM pg_temp.load_event ORDER BY latitude, longitude, row_number;
    PERFORM staging.merge_locations();

    INSERT INTO pg_temp.load_instant SELECT DISTINCT instant FROM pg_temp.load_event;
    PERFORM staging.merge_instants();

    INSERT INTO landslide_event (catalog_id, source, location_id, datetime_id, event_date, event_time,
                                 time_text, hazard_type, landslide_type, landslide_size)
    SELECT e.catalog_id, e.source, l.location_id, d.datetime_id, e.event_date, e.event_time,
           e.time_text, e.hazard_type, e.landslide_type, e.landslide_size
    FROM pg_temp.load_event e
    JOIN location l ON l.latitude = e.latitude AND l.longitude = e.longitude
    JOIN datetime d ON d.instant = e.instant
    ON CONFLICT (catalog_id) DO NOTHING;
    GET DIAGNOSTICS n_new = ROW_COUNT;
    SELECT count(*) INTO n_items FROM pg_temp.load_event;
    PERFORM staging.count_load('landslide_event', n_items + n_rejected, n_new, n_rejected);

    DELETE FROM staging.landslide_event WHERE run_id = p_run_id;
END $$;

-- Weather rows of one run -> location, datetime, weather_window, weather_data, soil.
CREATE OR REPLACE FUNCTION staging.merge_weather(p_run_id text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_items bigint;
    n_new bigint;
    n_new_soil bigint;
    n_rejected bigint;
BEGIN
    PERFORM staging.reject_violations('weather_hourly', 'staging.weather_candidate',
                                      '{weather_window,location,datetime,weather_data}', p_run_id);
    PERFORM staging.reject_violations('weather_hourly', 'staging.soil_candidate', '{soil}', p_run_id,
                                      $prefix$format('soil %s-%s cm: ', depth_top_cm, depth_bottom_cm)$prefix$);

    -- Every window belongs to a known event: its own day, or a day before it.
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'weather_hourly', staging_ctid, reason
    FROM (SELECT c.staging_ctid,
                 CASE WHEN c.event_id IS NULL THEN 'event_id is missing'
                      WHEN e.landslide_event_id IS NULL
                          THEN format('event_id %s is not in landslide_event (its catalog row is missing or was rejected)', c.event_id)
                      WHEN c.is_event AND c.window_date <> e.event_date
                          THEN format('event window_date %s is not the date of event %s (%s)',
                                      c.window_date, c.event_id, e.event_date)
                      WHEN NOT c.is_event AND c.window_date >= e.event_date
                          THEN format('non-event window_date %s is not before the date of event %s (%s)',
                                      c.window_date, c.event_id, e.event_date)
                 END AS reason
          FROM staging.weather_candidate c
          LEFT JOIN landslide_event e ON e.catalog_id = c.event_id
          WHERE c.run_id = p_run_id) r
    WHERE reason IS NOT NULL
    ON CONFLICT DO NOTHING;

    DROP TABLE IF EXISTS pg_temp.load_weather;
    CREATE TEMP TABLE load_weather ON COMMIT DROP AS
    SELECT c.*, e.landslide_event_id FROM staging.weather_candidate c
    JOIN landslide_event e ON e.catalog_id = c.event_id
    WHERE c.run_id = p_run_id
      AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                      WHERE r.staging_table = 'weather_hourly' AND r.staging_ctid = c.staging_ctid);
    ANALYZE pg_temp.load_weather;

    -- All hours of a window share its place and day: those of the stored
    -- window, if any, else the batch's earliest day and lowest coordinates.
    -- A row claiming otherwise is rejected.
    WITH batch AS (
        SELECT landslide_event_id, is_event, min(latitude) AS latitude, min(longitude) AS longitude,
               min(window_date) AS window_date
        FROM pg_temp.load_weather GROUP BY landslide_event_id, is_event
    ), expected AS (
        SELECT b.landslide_event_id, b.is_event,
               coalesce(l.latitude, b.latitude) AS latitude, coalesce(l.longitude, b.longitude) AS longitude,
               coalesce(w.window_date, b.window_date) AS window_date
        FROM batch b
        LEFT JOIN weather_window w ON w.landslide_event_id = b.landslide_event_id AND w.is_event = b.is_event
        LEFT JOIN location l ON l.location_id = w.location_id
    ), conflicting AS (
        DELETE FROM pg_temp.load_weather lw
        USING expected x
        WHERE lw.landslide_event_id = x.landslide_event_id AND lw.is_event = x.is_event
          AND (lw.latitude, lw.longitude, lw.window_date) IS DISTINCT FROM (x.latitude, x.longitude, x.window_date)
        RETURNING lw.staging_ctid, lw.event_id, lw.is_event, lw.latitude, lw.longitude, lw.window_date,
                  x.latitude AS x_latitude, x.longitude AS x_longitude, x.window_date AS x_window_date
    )
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'weather_hourly', staging_ctid,
           format('the %s window of event %s is at (%s, %s) on %s, this row says (%s, %s) on %s',
                  CASE WHEN is_event THEN 'event' ELSE 'non-event' END, event_id,
                  x_latitude, x_longitude, x_window_date, latitude, longitude, window_date)
    FROM conflicting
    ON CONFLICT DO NOTHING;

    INSERT INTO rejected_rows (source, row_key, raw, reason, run_id)
    SELECT 'open-meteo',
           format('event_id %s %s %s', coalesce(s.event_id, '?'),
                  CASE s.is_event WHEN true THEN 'event' WHEN false THEN 'non-event' ELSE '?' END,
                  coalesce(to_char(s.observed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"'), '?')),
           to_jsonb(s) - 'run_id', r.reason, s.run_id
    FROM staging.weather_hourly s
    JOIN pg_temp.load_reject r ON r.staging_table = 'weather_hourly' AND r.staging_ctid = s.ctid
    ON CONFLICT (source, row_key, reason) DO NOTHING;
    SELECT count(*) INTO n_rejected FROM pg_temp.load_reject WHERE staging_table = 'weather_hourly';

    INSERT INTO pg_temp.load_place
    SELECT latitude, longitude, min(elevation), NULL, NULL, NULL
    FROM pg_temp.load_weather GROUP BY latitude, longitude;
    PERFORM staging.merge_locations();

    INSERT INTO pg_temp.load_instant SELECT DISTINCT instant FROM pg_temp.load_weather;
    PERFORM staging.merge_instants();

    -- Each accepted hour with its keys, looked up once.
    DROP TABLE IF EXISTS pg_temp.load_hour;
    CREATE TEMP TABLE load_hour ON COMMIT DROP AS
    SELECT l.location_id, d.datetime_id, w.*
    FROM pg_temp.load_weather w
    JOIN location l ON l.latitude = w.latitude AND l.longitude = w.longitude
    JOIN datetime d ON d.instant = w.instant;
    DROP TABLE pg_temp.load_weather;
    ANALYZE pg_temp.load_hour;

    INSERT INTO weather_window (landslide_event_id, is_event, location_id, window_date, first_hour, last_hour)
    SELECT landslide_event_id, is_event, location_id, window_date, min(instant), max(instant)
    FROM pg_temp.load_hour
    GROUP BY landslide_event_id, is_event, location_id, window_date
    ON CONFLICT (landslide_event_id, is_event) DO NOTHING;
    GET DIAGNOSTICS n_new = ROW_COUNT;
    SELECT count(*) INTO n_items FROM (SELECT DISTINCT landslide_event_id, is_event FROM pg_temp.load_hour) k;
    PERFORM staging.count_load('weather_window', n_items, n_new);

    -- Hours added to a known window widen it.
    UPDATE weather_window w
    SET first_hour = least(w.first_hour, b.first_hour), last_hour = greatest(w.last_hour, b.last_hour)
    FROM (SELECT landslide_event_id, is_event, min(instant) AS first_hour, max(instant) AS last_hour
          FROM pg_temp.load_hour GROUP BY landslide_event_id, is_event) b
    WHERE w.landslide_event_id = b.landslide_event_id AND w.is_event = b.is_event
      AND (b.first_hour < w.first_hour OR b.last_hour > w.last_hour);

    -- A weather row and its soil rows are one measurement: an hour already
    -- stored keeps what was stored first, so soil goes in with new hours only.
    -- The same hour can come twice in a batch (two events on one day at one
    -- place); ON CONFLICT keeps one.
    WITH new_weather AS (
        INSERT INTO weather_data (location_id, datetime_id, temperature_2m, relative_humidity_2m, precipitation, rain)
        SELECT location_id, datetime_id, temperature_2m, relative_humidity_2m, precipitation, rain
        FROM pg_temp.load_hour
        ON CONFLICT (location_id, datetime_id) DO NOTHING
        RETURNING weather_id, location_id, datetime_id
    ), new_soil AS (
        INSERT INTO soil (weather_id, depth_top_cm, depth_bottom_cm, temperature, moisture)
        SELECT n.weather_id, s.depth_top_cm, s.depth_bottom_cm, s.temperature, s.moisture
        FROM new_weather n
        JOIN pg_temp.load_hour h ON h.location_id = n.location_id AND h.datetime_id = n.datetime_id
        CROSS JOIN LATERAL staging.soil_depths(
            h.soil_temperature_0_to_7cm, h.soil_temperature_7_to_28cm,
            h.soil_temperature_28_to_100cm, h.soil_temperature_100_to_255cm,
            h.soil_moisture_0_to_7cm, h.soil_moisture_7_to_28cm,
            h.soil_moisture_28_to_100cm, h.soil_moisture_100_to_255cm) s
        ON CONFLICT (weather_id, depth_top_cm) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM new_weather), (SELECT count(*) FROM new_soil) INTO n_new, n_new_soil;
    SELECT count(*) INTO n_items FROM pg_temp.load_hour;
    PERFORM staging.count_load('weather_data', n_items + n_rejected, n_new, n_rejected);

    SELECT count(*) INTO n_items
    FROM staging.soil_candidate c
    WHERE c.run_id = p_run_id
      AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                      WHERE r.staging_table = 'weather_hourly' AND r.staging_ctid = c.staging_ctid);
    PERFORM staging.count_load('soil', n_items, n_new_soil);

    DELETE FROM staging.weather_hourly WHERE run_id = p_run_id;
END $$;

-- Merges one run's staged rows into the star schema, set-based, in the
-- caller's transaction. Returns one row per target table: rows inserted, rows
-- that were already there (or came twice in the batch), staged rows rejected
-- (only landslide_event and weather_data have rejects: a rejected staged row
-- reaches no table at all). Re-running with the same data inserts nothing.
CREATE OR REPLACE FUNCTION load_staging(p_run_id text)
RETURNS TABLE (target text, inserted bigint, already_present bigint, rejected bigint)
LANGUAGE plpgsql
SET client_min_messages = warning  -- no NOTICE for each temp table set up
AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS load_reject (
        staging_table text, staging_ctid tid, reason text NOT NULL,
        PRIMARY KEY (staging_table, staging_ctid)) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_count (
        target text PRIMARY KEY, items bigint, inserted bigint, rejected bigint) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_place (
        latitude numeric, longitude numeric, elevation double precision,
        country text, near text, continent_code text) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_instant (instant timestamptz) ON COMMIT DROP;
    TRUNCATE pg_temp.load_reject, pg_temp.load_count, pg_temp.load_place, pg_temp.load_instant;

    PERFORM staging.count_load(t, 0, 0)
    FROM unnest('{landslide_event,location,datetime,weather_window,weather_data,soil}'::text[]) t;
    PERFORM staging.merge_events(p_run_id);
    PERFORM staging.merge_weather(p_run_id);

    RETURN QUERY
    SELECT c.target, c.inserted, c.items - c.inserted - c.rejected, c.rejected
    FROM pg_temp.load_count c
    ORDER BY array_position('{landslide_event,location,datetime,weather_window,weather_data,soil}'::text[], c.target);
END $$;

-- Views for people at psql.

-- One row per crawled window (an event's day or its non-event sample) with
-- the day's weather: sums of precipitation and rain, mean and max air
-- temperature, mean humidity, and the wettest soil per depth.
CREATE VIEW window_weather_daily AS
SELECT w.weather_window_id,
       w.landslide_event_id,
       e.catalog_id,
       w.is_event,
       w.window_date,
       l.latitude,
       l.longitude,
       l.elevation,
       wx.hours_observed,
       wx.precipitation_sum,
       wx.rain_sum,
       wx.temperature_2m_mean,
       wx.temperature_2m_max,
       wx.relative_humidity_2m_mean,
       sx.soil_moisture_0_to_7cm_max,
       sx.soil_moisture_7_to_28cm_max,
       sx.soil_moisture_28_to_100cm_max,
       sx.soil_moisture_100_to_255cm_max
FROM weather_window w
JOIN landslide_event e ON e.landslide_event_id = w.landslide_event_id
JOIN location l ON l.location_id = w.location_id
CROSS JOIN LATERAL (
    SELECT count(*) AS hours_observed,
           sum(wd.precipitation) AS precipitation_sum,
           sum(wd.rain) AS rain_sum,
           round(avg(wd.temperature_2m), 2) AS temperature_2m_mean,
           max(wd.temperature_2m) AS temperature_2m_max,
           round(avg(wd.relative_humidity_2m), 2) AS relative_humidity_2m_mean
    FROM weather_data wd
    JOIN datetime d ON d.datetime_id = wd.datetime_id
    WHERE wd.location_id = w.location_id AND d.instant BETWEEN w.first_hour AND w.last_hour
) wx
CROSS JOIN LATERAL (
    SELECT max(s.moisture) FILTER (WHERE s.depth_top_cm = 0) AS soil_moisture_0_to_7cm_max,
           max(s.moisture) FILTER (WHERE s.depth_top_cm = 7) AS soil_moisture_7_to_28cm_max,
           max(s.moisture) FILTER (WHERE s.depth_top_cm = 28) AS soil_moisture_28_to_100cm_max,
           max(s.moisture) FILTER (WHERE s.depth_top_cm = 100) AS soil_moisture_100_to_255cm_max
    FROM weather_data wd
    JOIN datetime d ON d.datetime_id = wd.datetime_id
    JOIN soil s ON s.weather_id = wd.weather_id
    WHERE wd.location_id = w.location_id AND d.instant BETWEEN w.first_hour AND w.last_hour
) sx;

-- One row per landslide event with its day's weather (NULLs until the
-- event's day has been crawled).
CREATE VIEW event_weather_daily AS
SELECT e.catalog_id,
       e.event_date,
       e.event_time,
       e.time_text,
       e.hazard_type,
       e.landslide_type,
       e.landslide_size,
       l.country,
       l.near,
       l.continent_code,
       l.latitude,
       l.longitude,
       l.elevation,
       f.hours_observed,
       f.precipitation_sum,
       f.rain_sum,
       f.temperature_2m_mean,
       f.temperature_2m_max,
       f.relative_humidity_2m_mean,
       f.soil_moisture_0_to_7cm_max,
       f.soil_moisture_7_to_28cm_max,
       f.soil_moisture_28_to_100cm_max,
       f.soil_moisture_100_to_255cm_max
FROM landslide_event e
JOIN location l ON l.location_id = e.location_id
LEFT JOIN window_weather_daily f ON f.landslide_event_id = e.landslide_event_id AND f.is_event;

-- Training set: every crawled day labelled 'event' or 'non-event', same
-- features. catalog_id says which event a non-event day was sampled for.
CREATE VIEW training_days AS
SELECT CASE WHEN f.is_event THEN 'event' ELSE 'non-event' END AS label,
       f.catalog_id,
       f.window_date,
       f.latitude,
       f.longitude,
       f.elevation,
       f.hours_observed,
       f.precipitation_sum,
       f.rain_sum,
       f.temperature_2m_mean,
       f.temperature_2m_max,
       f.relative_humidity_2m_mean,
       f.soil_moisture_0_to_7cm_max,
       f.soil_moisture_7_to_28cm_max,
       f.soil_moisture_28_to_100cm_max,
       f.soil_moisture_100_to_255cm_max
FROM window_weather_daily f;

COMMIT;
