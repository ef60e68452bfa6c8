-- VPE warehouse loading and reading: the set-based merge from staging into the
-- tables (load_staging), the watermark per source, the views people query and
-- the roles' grants. Only functions, views and grants live here, no data:
-- re-applying is always safe.
--
-- How a load works (tasks/ingestion/load.py, one transaction, as vpe_loader):
--   COPY rows into staging.landslide_event, staging.weather_hourly and
--   staging.pending_window with a run_id, then SELECT * FROM load_staging(run_id).
--   Every staged row of that run ends up either in the tables (new, updated
--   or already present) or in rejected_rows with a reason; the run's staging
--   rows are then deleted.
--
-- Contents (each a `-- =====` banner below):
--   rebuild             what every apply drops and creates anew
--   column lists        the hourly measurements and daily features, named once
--   staging candidates  staged rows shaped like the tables' columns
--   rejects and counts  constraints -> reject reasons, rejected_rows, counts
--   merges              merge_locations, merge_events, merge_weather, merge_pending
--   load_staging        the one function a load calls
--   watermark and keys  source_watermark, location_keeps_its_hours
--   views               for people at psql
--   grants

SET client_min_messages = warning;

BEGIN;

-- ===== rebuild =====

-- Views hold no data: they are rebuilt on every apply so that a changed
-- column list or type takes effect (CREATE OR REPLACE VIEW cannot do that).
-- No CASCADE: a view someone built on these stops the apply with an error
-- instead of vanishing. (staging.soil_candidate and the functions dropped
-- after it are version 2's.)
DROP VIEW IF EXISTS training_days, event_weather_daily, window_weather_daily, hourly_weather, soil, weather_data,
    staging.soil_candidate, staging.weather_candidate, staging.landslide_event_candidate,
    staging.pending_window_candidate, staging.stored_event;
DROP FUNCTION IF EXISTS staging.soil_depths, staging.merge_instants(),
    staging.reject_violations(text, regclass, regclass[], text, text), staging.count_load(text, bigint, bigint, bigint);
-- Its result columns changed in version 3; it is re-granted below.
DROP FUNCTION IF EXISTS load_staging(text);

-- ===== column lists =====

-- The columns of p_relation after p_after, as p_alias.column, in order. The
-- hourly measurements are weather_hour's columns after observed_at (ddl.sql
-- lists them, with their checks); the daily features are
-- window_weather_daily's after elevation (its lateral query defines them).
-- The views and the insert that repeat a list are written with this.
CREATE OR REPLACE FUNCTION staging.columns_after(p_relation regclass, p_after name, p_alias text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT string_agg(format('%I.%I', p_alias, a.attname), ', ' ORDER BY a.attnum)
    FROM pg_attribute a
    WHERE a.attrelid = p_relation AND NOT a.attisdropped
      AND a.attnum > (SELECT attnum FROM pg_attribute WHERE attrelid = p_relation AND attname = p_after)
$$;

-- ===== staging candidates =====

-- Staged rows shaped like the tables' columns (same names), so the tables'
-- own CHECK and NOT NULL constraints can be evaluated on them before anything
-- is inserted. Coordinates are rounded here as they are stored (they are the
-- location key); measurements keep the file's digits, which the range checks
-- compare directly and the insert rounds to the column's scale.

CREATE VIEW staging.landslide_event_candidate AS
SELECT s.ctid AS staging_ctid,
       s.run_id,
       s.source,
       s.row_number,
       nullif(btrim(s.catalog_id), '') AS catalog_id,
       s.event_date,
       s.event_time,
       nullif(btrim(s.time_text), '') AS time_text,
       s.last_edited,
       nullif(btrim(s.title), '') AS title,
       nullif(btrim(s.country), '') AS country,
       nullif(btrim(s.country_code), '') AS country_code,
       nullif(btrim(s.admin_division), '') AS admin_division,
       nullif(btrim(s.near), '') AS near,
       upper(nullif(btrim(s.continent_code), '')) AS continent_code,
       nullif(btrim(s.location_accuracy), '') AS location_accuracy,
       nullif(btrim(s.hazard_type), '') AS hazard_type,
       nullif(btrim(s.landslide_category), '') AS landslide_category,
       nullif(btrim(s.landslide_trigger), '') AS landslide_trigger,
       nullif(btrim(s.landslide_size), '') AS landslide_size,
       nullif(btrim(s.landslide_setting), '') AS landslide_setting,
       s.fatalities,
       s.injuries,
       nullif(btrim(s.source_link), '') AS source_link,
       round(s.latitude::numeric, 6) AS latitude,
       round(s.longitude::numeric, 6) AS longitude,
       s.elevation
FROM staging.landslide_event s;

-- The stored version of each report, shaped like the candidate above.
CREATE VIEW staging.stored_event AS
SELECT e.landslide_event_id, e.location_id, e.source, e.catalog_id, e.event_date, e.event_time, e.time_text,
       e.last_edited, e.title, e.country, e.country_code, e.admin_division, e.near, e.continent_code::text,
       e.location_accuracy, e.hazard_type, e.landslide_category, e.landslide_trigger, e.landslide_size,
       e.landslide_setting, e.fatalities, e.injuries, e.source_link, l.latitude, l.longitude
FROM landslide_event e
JOIN location l ON l.location_id = e.location_id;

-- What the catalog says about a report, from a candidate or a stored event as
-- jsonb: everything but where and when it was read.
CREATE OR REPLACE FUNCTION staging.event_content(p_event jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_event - '{staging_ctid,run_id,source,row_number,elevation,landslide_event_id,location_id,version,stored_last_edited}'::text[]
$$;

DO $$
BEGIN
    EXECUTE format($view$
CREATE VIEW staging.weather_candidate AS
SELECT s.ctid AS staging_ctid,
       s.run_id,
       s.catalog_id,
       s.is_event,
       s.window_date,
       s.observed_at,
       nullif(btrim(s.timezone), '') AS timezone,
       round(s.latitude, 6) AS latitude,
       round(s.longitude, 6) AS longitude,
       s.elevation,
       %s
FROM staging.weather_hourly s
    $view$, staging.columns_after('weather_hour', 'observed_at', 's'));
END $$;

CREATE VIEW staging.pending_window_candidate AS
SELECT s.ctid AS staging_ctid,
       s.run_id,
       nullif(btrim(s.catalog_id), '') AS catalog_id,
       s.is_event,
       round(s.latitude::numeric, 6) AS latitude,
       round(s.longitude::numeric, 6) AS longitude,
       s.window_date
FROM staging.pending_window s;

-- ===== rejects and counts =====

-- An instant as rejects and messages show it: 2019-03-10T14:00Z.
CREATE OR REPLACE FUNCTION staging.utc_text(p_instant timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(p_instant AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"')
$$;

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
    p_staging_table text, p_rows regclass, p_targets regclass[], p_run_id text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    checks text;
BEGIN
    SELECT string_agg(staging.constraint_violation_sql(t, p_rows), ', ' ORDER BY n)
    INTO checks FROM unnest(p_targets) WITH ORDINALITY AS u(t, n);
    EXECUTE format($sql$
        INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
        SELECT %L, staging_ctid, reason
        FROM (SELECT staging_ctid, coalesce(%s) AS reason FROM %s WHERE run_id = $1) AS r
        WHERE reason IS NOT NULL
        ON CONFLICT DO NOTHING$sql$, p_staging_table, checks, p_rows)
    USING p_run_id;
END $$;

-- Records the run's rejected rows of one staging table in rejected_rows
-- (p_row_key_sql: the row's key, an expression over the staging row s) and
-- returns how many there are.
CREATE OR REPLACE FUNCTION staging.record_rejects(
    p_staging_table text, p_run_id text, p_source_sql text, p_row_key_sql text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n_rejected bigint;
BEGIN
    SELECT count(*) INTO n_rejected FROM pg_temp.load_reject WHERE staging_table = p_staging_table;
    IF n_rejected = 0 THEN
        RETURN 0;
    END IF;
    EXECUTE format($sql$
        INSERT INTO rejected_rows (source, row_key, raw, reason, run_id)
        SELECT %s, %s, to_jsonb(s) - 'run_id', r.reason, s.run_id
        FROM staging.%I s
        JOIN pg_temp.load_reject r ON r.staging_table = %L AND r.staging_ctid = s.ctid
        WHERE s.run_id = $1
        ON CONFLICT (source, row_key, reason) DO NOTHING$sql$,
        p_source_sql, p_row_key_sql, p_staging_table, p_staging_table)
    USING p_run_id;
    RETURN n_rejected;
END $$;

-- The condition that leaves a staged weather row c out when it was rejected:
-- none at all when no row was (its anti-join costs a tenth of the merge).
CREATE OR REPLACE FUNCTION staging.accepted_rows_sql(p_rejected bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_rejected > 0 THEN
        $q$AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                           WHERE r.staging_table = 'weather_hourly' AND r.staging_ctid = c.staging_ctid)$q$
    ELSE '' END
$$;

-- Adds to the counts load_staging returns.
CREATE OR REPLACE FUNCTION staging.count_load(
    p_target text, p_items bigint, p_inserted bigint, p_rejected bigint DEFAULT 0, p_updated bigint DEFAULT 0)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pg_temp.load_count AS c (target, items, inserted, updated, rejected)
    VALUES (p_target, p_items, p_inserted, p_updated, p_rejected)
    ON CONFLICT (target) DO UPDATE
    SET items = c.items + excluded.items, inserted = c.inserted + excluded.inserted,
        updated = c.updated + excluded.updated, rejected = c.rejected + excluded.rejected;
END $$;

-- ===== merges =====

-- Inserts the places in pg_temp.load_place (one row per coordinate pair) and
-- fills gaps (elevation, country, ...) in places already known; never
-- overwrites a stored value, except a time zone of 'GMT'/'UTC' (what a crawl
-- that asked for UTC is told) by a place's own zone, and the country, near
-- and continent of a place a new or newer report version describes
-- (p.describes): the catalog as extract reads it now describes the place, so
-- a place stored by an older extract (version 2 read the legacy `country`,
-- not `countryname`) says what a fresh load says once its reports are loaded
-- again.
CREATE OR REPLACE FUNCTION staging.merge_locations() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_new bigint;
BEGIN
    INSERT INTO location (latitude, longitude, elevation, country, near, continent_code, timezone)
    SELECT latitude, longitude, elevation, country, near, continent_code, timezone FROM pg_temp.load_place
    ON CONFLICT (latitude, longitude) DO NOTHING;
    GET DIAGNOSTICS n_new = ROW_COUNT;

    UPDATE location l
    SET elevation = coalesce(l.elevation, p.elevation),
        country = CASE WHEN p.describes THEN coalesce(p.country, l.country) ELSE coalesce(l.country, p.country) END,
        near = CASE WHEN p.describes THEN coalesce(p.near, l.near) ELSE coalesce(l.near, p.near) END,
        continent_code = CASE WHEN p.describes THEN coalesce(p.continent_code, l.continent_code)
                              ELSE coalesce(l.continent_code, p.continent_code) END,
        timezone = CASE WHEN l.timezone IS NULL OR l.timezone IN ('GMT', 'UTC') THEN coalesce(p.timezone, l.timezone)
                        ELSE l.timezone END
    FROM pg_temp.load_place p
    WHERE l.latitude = p.latitude AND l.longitude = p.longitude
      AND ((l.elevation IS NULL AND p.elevation IS NOT NULL) OR (l.country IS NULL AND p.country IS NOT NULL)
           OR (l.near IS NULL AND p.near IS NOT NULL)
           OR (l.continent_code IS NULL AND p.continent_code IS NOT NULL)
           OR (p.describes AND (coalesce(p.country, l.country), coalesce(p.near, l.near),
                                coalesce(p.continent_code, l.continent_code))
                               IS DISTINCT FROM (l.country, l.near, l.continent_code))
           OR (p.timezone IS DISTINCT FROM l.timezone AND p.timezone IS NOT NULL
               AND (l.timezone IS NULL OR l.timezone IN ('GMT', 'UTC'))));

    PERFORM staging.count_load('location', (SELECT count(*) FROM pg_temp.load_place), n_new);
    TRUNCATE pg_temp.load_place;
END $$;

-- Catalog rows of one run -> location, landslide_event (new or updated, the
-- replaced version into landslide_event_history), load_watermark.
CREATE OR REPLACE FUNCTION staging.merge_events(p_run_id text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_items bigint;
    n_new bigint;
    n_updated bigint;
    n_rejected bigint;
BEGIN
    PERFORM staging.reject_violations('landslide_event', 'staging.landslide_event_candidate',
                                      '{landslide_event,location}', p_run_id);

    -- A catalog id twice in one batch with other values (identical rows were
    -- staged once): the newest version counts, among equals the first row.
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'landslide_event', staging_ctid, format('repeats catalog_id %s of row %s', catalog_id, first_row)
    FROM (SELECT c.staging_ctid, c.catalog_id,
                 row_number() OVER w AS nth, first_value(c.row_number) OVER w AS first_row
          FROM staging.landslide_event_candidate c
          WHERE c.run_id = p_run_id
            AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                            WHERE r.staging_table = 'landslide_event' AND r.staging_ctid = c.staging_ctid)
          WINDOW w AS (PARTITION BY c.catalog_id ORDER BY c.last_edited DESC NULLS LAST, c.row_number, c.staging_ctid)) d
    WHERE nth > 1
    ON CONFLICT DO NOTHING;

    -- Each accepted row against the stored version of its report: new, the
    -- same, newer (a later last_edited; or both undated: the later load wins)
    -- or older (not newer than a dated stored version).
    DROP TABLE IF EXISTS pg_temp.load_event;
    CREATE TEMP TABLE load_event ON COMMIT DROP AS
    SELECT c.*, s.landslide_event_id, s.last_edited AS stored_last_edited,
           CASE WHEN s.landslide_event_id IS NULL THEN 'new'
                WHEN staging.event_content(to_jsonb(c)) = staging.event_content(to_jsonb(s)) THEN 'same'
                WHEN s.last_edited IS NULL OR c.last_edited > s.last_edited THEN 'newer'
                ELSE 'older'
           END AS version
    FROM staging.landslide_event_candidate c
    LEFT JOIN staging.stored_event s ON s.catalog_id = c.catalog_id
    WHERE c.run_id = p_run_id
      AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                      WHERE r.staging_table = 'landslide_event' AND r.staging_ctid = c.staging_ctid);

    WITH older AS (
        DELETE FROM pg_temp.load_event WHERE version = 'older'
        RETURNING staging_ctid, catalog_id, last_edited, stored_last_edited
    )
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'landslide_event', staging_ctid,
           format('catalog_id %s: this version (%s) is not newer than the stored one (last edited %s), which is kept',
                  catalog_id, coalesce('last edited ' || staging.utc_text(last_edited), 'undated'),
                  staging.utc_text(stored_last_edited))
    FROM older
    ON CONFLICT DO NOTHING;

    n_rejected := staging.record_rejects(
        'landslide_event', p_run_id, $q$coalesce(s.source, 'landslide catalog')$q$,
        $q$coalesce(nullif(concat_ws(' ', 'catalog_id ' || s.catalog_id, 'row ' || s.row_number), ''), 'unidentified row')$q$);

    -- Several events at one place: the first catalog row describes the place.
    INSERT INTO pg_temp.load_place
    SELECT DISTINCT ON (latitude, longitude) latitude, longitude, elevation, country, near, continent_code, NULL,
           version IN ('new', 'newer')
    FROM pg_temp.load_event ORDER BY latitude, longitude, row_number;
    PERFORM staging.merge_locations();

    INSERT INTO landslide_event_history (landslide_event_id, catalog_id, last_edited, version, replaced_by_run)
    SELECT s.landslide_event_id, s.catalog_id, s.last_edited, to_jsonb(s) - 'landslide_event_id', p_run_id
    FROM staging.stored_event s
    JOIN pg_temp.load_event e ON e.landslide_event_id = s.landslide_event_id AND e.version = 'newer';

    UPDATE landslide_event t
    SET (source, location_id, event_date, event_time, time_text, last_edited, title, country, country_code,
         admin_division, near, continent_code, location_accuracy, hazard_type, landslide_category,
         landslide_trigger, landslide_size, landslide_setting, fatalities, injuries, source_link, updated_at)
      = (e.source, l.location_id, e.event_date, e.event_time, e.time_text, e.last_edited, e.title, e.country,
         e.country_code, e.admin_division, e.near, e.continent_code, e.location_accuracy, e.hazard_type,
         e.landslide_category, e.landslide_trigger, e.landslide_size, e.landslide_setting, e.fatalities,
         e.injuries, e.source_link, now())
    FROM pg_temp.load_event e
    JOIN location l ON l.latitude = e.latitude AND l.longitude = e.longitude
    WHERE t.landslide_event_id = e.landslide_event_id AND e.version = 'newer';
    GET DIAGNOSTICS n_updated = ROW_COUNT;

    -- An edit that moves the event's place or day leaves its windows behind:
    -- they go (their hours stay in weather_hour) and the next crawl fetches
    -- the windows of the new place and day.
    DELETE FROM weather_window w
    USING landslide_event e
    WHERE e.landslide_event_id = w.landslide_event_id
      AND e.landslide_event_id IN (SELECT landslide_event_id FROM pg_temp.load_event WHERE version = 'newer')
      AND (w.location_id <> e.location_id OR (w.is_event AND w.window_date <> e.event_date)
           OR (NOT w.is_event AND w.window_date >= e.event_date));
    DELETE FROM pending_window p
    USING landslide_event e
    JOIN location l ON l.location_id = e.location_id
    WHERE e.landslide_event_id = p.landslide_event_id
      AND e.landslide_event_id IN (SELECT landslide_event_id FROM pg_temp.load_event WHERE version = 'newer')
      AND ((p.latitude, p.longitude) <> (l.latitude, l.longitude) OR (p.is_event AND p.window_date <> e.event_date)
           OR (NOT p.is_event AND p.window_date >= e.event_date));

    INSERT INTO landslide_event (catalog_id, source, location_id, event_date, event_time, time_text, last_edited,
                                 title, country, country_code, admin_division, near, continent_code,
                                 location_accuracy, hazard_type, landslide_category, landslide_trigger,
                                 landslide_size, landslide_setting, fatalities, injuries, source_link)
    SELECT e.catalog_id, e.source, l.location_id, e.event_date, e.event_time, e.time_text, e.last_edited,
           e.title, e.country, e.country_code, e.admin_division, e.near, e.continent_code,
           e.location_accuracy, e.hazard_type, e.landslide_category, e.landslide_trigger,
           e.landslide_size, e.landslide_setting, e.fatalities, e.injuries, e.source_link
    FROM pg_temp.load_event e
    JOIN location l ON l.latitude = e.latitude AND l.longitude = e.longitude
    WHERE e.version = 'new';
    GET DIAGNOSTICS n_new = ROW_COUNT;
    SELECT count(*) INTO n_items FROM pg_temp.load_event;
    PERFORM staging.count_load('landslide_event', n_items + n_rejected, n_new, n_rejected, n_updated);

    INSERT INTO load_watermark AS w (source, last_edited, run_id)
    SELECT source, max(last_edited), p_run_id FROM pg_temp.load_event
    WHERE last_edited IS NOT NULL GROUP BY source
    ON CONFLICT (source) DO UPDATE
    SET last_edited = excluded.last_edited, advanced_at = now(), run_id = excluded.run_id
    WHERE excluded.last_edited > w.last_edited;

    DELETE FROM staging.landslide_event WHERE run_id = p_run_id;
END $$;

-- Weather rows of one run -> location (with its time zone), weather_window, weather_hour.
-- Built for volume: the staged rows are read three times and copied nowhere
-- in between: a pass that checks each row (the tables' constraints, its
-- event, its window's day, its zone) and notes only the rejects, a pass that
-- groups the accepted rows into windows (pg_temp.load_window: everything per
-- window or place works on it), and the INSERT of the hours.
CREATE OR REPLACE FUNCTION staging.merge_weather(p_run_id text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    checks text;
    insert_hours text;
    n_items bigint;
    n_windows bigint;
    n_new bigint;
    n_rejected bigint;
BEGIN
    SELECT string_agg(staging.constraint_violation_sql(t, 'staging.weather_candidate'), ', ' ORDER BY n)
    INTO checks FROM unnest('{weather_window,location,weather_hour}'::regclass[]) WITH ORDINALITY AS u(t, n);

    -- Every window belongs to a known event: its own day, or a day before it.
    EXECUTE format($sql$
        INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
        SELECT 'weather_hourly', staging_ctid, reason
        FROM (SELECT c.staging_ctid,
                     coalesce(c.violation,
                         CASE WHEN c.catalog_id IS NULL THEN 'catalog_id is missing'
                              WHEN e.landslide_event_id IS NULL
                                  THEN format('catalog_id %%s is not in landslide_event (its catalog row is missing or was rejected)', c.catalog_id)
                              WHEN c.is_event AND c.window_date <> e.event_date
                                  THEN format('event window_date %%s is not the date of event %%s (%%s)',
                                              c.window_date, c.catalog_id, e.event_date)
                              WHEN NOT c.is_event AND c.window_date >= e.event_date
                                  THEN format('non-event window_date %%s is not before the date of event %%s (%%s)',
                                              c.window_date, c.catalog_id, e.event_date)
                              WHEN c.timezone IS NOT NULL AND z.name IS NULL
                                  THEN format('timezone %%s is not in the tz database', c.timezone)
                         END) AS reason
              FROM (SELECT *, coalesce(%s) AS violation FROM staging.weather_candidate WHERE run_id = $1) c
              LEFT JOIN landslide_event e ON e.catalog_id = c.catalog_id
              LEFT JOIN (SELECT name FROM pg_timezone_names) z ON z.name = c.timezone) r
        WHERE reason IS NOT NULL$sql$, checks)
    USING p_run_id;
    GET DIAGNOSTICS n_rejected = ROW_COUNT;

    DROP TABLE IF EXISTS pg_temp.load_window;
    EXECUTE format($sql$
        CREATE TEMP TABLE load_window ON COMMIT DROP AS
        SELECT e.landslide_event_id, c.catalog_id, c.is_event, c.latitude, c.longitude, c.window_date,
               min(c.observed_at) AS first_hour, max(c.observed_at) AS last_hour,
               min(c.elevation) AS elevation, min(c.timezone) AS timezone, count(*) AS hours
        FROM staging.weather_candidate c
        JOIN landslide_event e ON e.catalog_id = c.catalog_id
        WHERE c.run_id = $1 %s
        GROUP BY e.landslide_event_id, c.catalog_id, c.is_event, c.latitude, c.longitude, c.window_date$sql$,
        staging.accepted_rows_sql(n_rejected))
    USING p_run_id;

    -- All hours of a window share its place and day: those of the stored
    -- window, if any, else the batch's earliest day and lowest coordinates.
    -- A row claiming otherwise is rejected.
    WITH batch AS (
        SELECT landslide_event_id, is_event, min(latitude) AS latitude, min(longitude) AS longitude,
               min(window_date) AS window_date
        FROM pg_temp.load_window GROUP BY landslide_event_id, is_event
    ), expected AS (
        SELECT b.landslide_event_id, b.is_event,
               coalesce(l.latitude, b.latitude) AS latitude, coalesce(l.longitude, b.longitude) AS longitude,
               coalesce(w.window_date, b.window_date) AS window_date
        FROM batch b
        LEFT JOIN weather_window w ON w.landslide_event_id = b.landslide_event_id AND w.is_event = b.is_event
        LEFT JOIN location l ON l.location_id = w.location_id
    ), conflicting AS (
        DELETE FROM pg_temp.load_window lw
        USING expected x
        WHERE lw.landslide_event_id = x.landslide_event_id AND lw.is_event = x.is_event
          AND (lw.latitude, lw.longitude, lw.window_date) IS DISTINCT FROM (x.latitude, x.longitude, x.window_date)
        RETURNING lw.catalog_id, lw.is_event, lw.latitude, lw.longitude, lw.window_date,
                  format('the %s window of event %s is at (%s, %s) on %s, this row says (%s, %s) on %s',
                         CASE WHEN lw.is_event THEN 'event' ELSE 'non-event' END, lw.catalog_id, x.latitude,
                         x.longitude, x.window_date, lw.latitude, lw.longitude, lw.window_date) AS reason
    )
    INSERT INTO pg_temp.load_conflict SELECT * FROM conflicting;
    IF FOUND THEN
        INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
        SELECT 'weather_hourly', c.staging_ctid, k.reason
        FROM staging.weather_candidate c
        JOIN pg_temp.load_conflict k
          ON (c.catalog_id, c.is_event, c.latitude, c.longitude, c.window_date)
           = (k.catalog_id, k.is_event, k.latitude, k.longitude, k.window_date)
        WHERE c.run_id = p_run_id
        ON CONFLICT DO NOTHING;
    END IF;

    n_rejected := staging.record_rejects(
        'weather_hourly', p_run_id, $q$'open-meteo'$q$,
        $q$format('catalog_id %s %s %s', coalesce(s.catalog_id, '?'),
                 CASE s.is_event WHEN true THEN 'event' WHEN false THEN 'non-event' ELSE '?' END,
                 coalesce(staging.utc_text(s.observed_at), '?'))$q$);

    INSERT INTO pg_temp.load_place
    SELECT latitude, longitude, min(elevation), NULL, NULL, NULL, min(timezone), false
    FROM pg_temp.load_window GROUP BY latitude, longitude;
    PERFORM staging.merge_locations();

    -- New windows go in; hours added to a known window widen it.
    WITH batch AS (
        SELECT w.landslide_event_id, w.is_event, l.location_id, w.window_date, w.first_hour, w.last_hour
        FROM pg_temp.load_window w
        JOIN location l ON l.latitude = w.latitude AND l.longitude = w.longitude
    ), new_window AS (
        INSERT INTO weather_window (landslide_event_id, is_event, location_id, window_date, first_hour, last_hour)
        SELECT landslide_event_id, is_event, location_id, window_date, first_hour, last_hour FROM batch
        ON CONFLICT (landslide_event_id, is_event) DO NOTHING
        RETURNING 1
    ), widened AS (
        UPDATE weather_window w
        SET first_hour = least(w.first_hour, b.first_hour), last_hour = greatest(w.last_hour, b.last_hour)
        FROM batch b
        WHERE w.landslide_event_id = b.landslide_event_id AND w.is_event = b.is_event
          AND (b.first_hour < w.first_hour OR b.last_hour > w.last_hour)
    )
    SELECT (SELECT count(*) FROM batch), (SELECT count(*) FROM new_window) INTO n_windows, n_new;
    PERFORM staging.count_load('weather_window', n_windows, n_new);

    -- An hour already stored keeps what was stored first, and an hour that
    -- comes twice in a batch (two events on one day at one place) goes in
    -- once: ON CONFLICT. The usual batch, new hours only, skips its cost (a
    -- quarter of the INSERT) with a plain INSERT, redone with ON CONFLICT if
    -- an hour turns out to be there twice.
    insert_hours := format($sql$
        INSERT INTO weather_hour
        SELECT l.location_id, c.observed_at, %s
        FROM staging.weather_candidate c
        JOIN location l ON l.latitude = c.latitude AND l.longitude = c.longitude
        WHERE c.run_id = $1 %s$sql$,
        staging.columns_after('weather_hour', 'observed_at', 'c'), staging.accepted_rows_sql(n_rejected));
    n_new := NULL;
    IF NOT EXISTS (SELECT 1 FROM pg_temp.load_window w
                   JOIN location l ON l.latitude = w.latitude AND l.longitude = w.longitude
                   JOIN weather_hour h ON h.location_id = l.location_id
                                      AND h.observed_at BETWEEN w.first_hour AND w.last_hour) THEN
        BEGIN
            EXECUTE insert_hours USING p_run_id;
            GET DIAGNOSTICS n_new = ROW_COUNT;
        EXCEPTION WHEN unique_violation THEN
            n_new := NULL;
        END;
    END IF;
    IF n_new IS NULL THEN
        EXECUTE insert_hours || ' ON CONFLICT (location_id, observed_at) DO NOTHING' USING p_run_id;
        GET DIAGNOSTICS n_new = ROW_COUNT;
    END IF;
    SELECT coalesce(sum(hours), 0) + n_rejected INTO n_items FROM pg_temp.load_window;
    PERFORM staging.count_load('weather_hour', n_items, n_new, n_rejected);

    DELETE FROM staging.weather_hourly WHERE run_id = p_run_id;
END $$;

-- Windows the crawl could not fetch yet (archive lag) of one run ->
-- pending_window; a window whose hours are loaded is no longer pending.
CREATE OR REPLACE FUNCTION staging.merge_pending(p_run_id text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_items bigint;
    n_new bigint;
    n_rejected bigint;
BEGIN
    PERFORM staging.reject_violations('pending_window', 'staging.pending_window_candidate', '{pending_window}',
                                      p_run_id);
    INSERT INTO pg_temp.load_reject (staging_table, staging_ctid, reason)
    SELECT 'pending_window', c.staging_ctid,
           CASE WHEN c.catalog_id IS NULL THEN 'catalog_id is missing'
                ELSE format('catalog_id %s is not in landslide_event (its catalog row is missing or was rejected)',
                            c.catalog_id) END
    FROM staging.pending_window_candidate c
    WHERE c.run_id = p_run_id AND NOT EXISTS (SELECT 1 FROM landslide_event e WHERE e.catalog_id = c.catalog_id)
    ON CONFLICT DO NOTHING;
    n_rejected := staging.record_rejects(
        'pending_window', p_run_id, $q$'crawl pending windows'$q$,
        $q$format('catalog_id %s %s %s', coalesce(s.catalog_id, '?'),
                 CASE s.is_event WHEN true THEN 'event' WHEN false THEN 'non-event' ELSE '?' END,
                 coalesce(s.window_date::text, '?'))$q$);

    WITH accepted AS (
        SELECT DISTINCT ON (e.landslide_event_id, c.is_event)
               e.landslide_event_id, c.is_event, c.latitude, c.longitude, c.window_date
        FROM staging.pending_window_candidate c
        JOIN landslide_event e ON e.catalog_id = c.catalog_id
        WHERE c.run_id = p_run_id
          AND NOT EXISTS (SELECT 1 FROM pg_temp.load_reject r
                          WHERE r.staging_table = 'pending_window' AND r.staging_ctid = c.staging_ctid)
        ORDER BY e.landslide_event_id, c.is_event, c.window_date
    ), upserted AS (
        INSERT INTO pending_window AS p (landslide_event_id, is_event, latitude, longitude, window_date)
        SELECT a.landslide_event_id, a.is_event, a.latitude, a.longitude, a.window_date FROM accepted a
        WHERE NOT EXISTS (SELECT 1 FROM weather_window w
                          WHERE w.landslide_event_id = a.landslide_event_id AND w.is_event = a.is_event)
        ON CONFLICT (landslide_event_id, is_event) DO UPDATE
        SET latitude = excluded.latitude, longitude = excluded.longitude, window_date = excluded.window_date,
            last_checked = now()
        RETURNING xmax = 0 AS inserted
    )
    SELECT (SELECT count(*) FROM upserted WHERE inserted) INTO n_new;
    SELECT count(*) INTO n_items FROM staging.pending_window WHERE run_id = p_run_id;
    PERFORM staging.count_load('pending_window', n_items, n_new, n_rejected);

    DELETE FROM pending_window p
    USING weather_window w
    WHERE w.landslide_event_id = p.landslide_event_id AND w.is_event = p.is_event;

    DELETE FROM staging.pending_window WHERE run_id = p_run_id;
END $$;

-- An event's zone is its place's: set (and its instant computed) once the
-- place's weather has named the zone, and again when an edit moves the event.
CREATE OR REPLACE FUNCTION staging.settle_event_zones() RETURNS void LANGUAGE sql AS $$
    UPDATE landslide_event e SET timezone = l.timezone
    FROM location l
    WHERE l.location_id = e.location_id AND e.timezone IS DISTINCT FROM l.timezone
$$;

-- ===== load_staging =====

-- Merges one run's staged rows into the tables, set-based, in the caller's
-- transaction. Returns one row per target table: rows inserted, rows updated
-- (a newer version of a report), rows that were already there (or came twice
-- in the batch), staged rows rejected (into rejected_rows with the reason).
-- Re-running with the same data inserts nothing.
--
-- Runs as its owner (the schema's), so vpe_loader needs no write access to
-- the tables; loads take turns (a transaction-level advisory lock), so two
-- loads of the same rows count each row once.
CREATE FUNCTION load_staging(p_run_id text)
RETURNS TABLE (target text, inserted bigint, updated bigint, already_present bigint, rejected bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
SET client_min_messages = warning  -- no NOTICE for each temp table set up
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('vpe load_staging'));
    CREATE TEMP TABLE IF NOT EXISTS load_reject (
        staging_table text, staging_ctid tid, reason text NOT NULL,
        PRIMARY KEY (staging_table, staging_ctid)) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_count (
        target text PRIMARY KEY, items bigint, inserted bigint, updated bigint, rejected bigint) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_place (
        latitude numeric, longitude numeric, elevation numeric,
        country text, near text, continent_code text, timezone text, describes boolean NOT NULL) ON COMMIT DROP;
    CREATE TEMP TABLE IF NOT EXISTS load_conflict (
        catalog_id text, is_event boolean, latitude numeric, longitude numeric, window_date date,
        reason text) ON COMMIT DROP;
    TRUNCATE pg_temp.load_reject, pg_temp.load_count, pg_temp.load_place, pg_temp.load_conflict;

    PERFORM staging.count_load(t, 0, 0)
    FROM unnest('{landslide_event,location,weather_window,weather_hour,pending_window}'::text[]) t;
    PERFORM staging.merge_events(p_run_id);
    PERFORM staging.merge_weather(p_run_id);
    PERFORM staging.merge_pending(p_run_id);
    PERFORM staging.settle_event_zones();

    RETURN QUERY
    SELECT c.target, c.inserted, c.updated, c.items - c.inserted - c.updated - c.rejected, c.rejected
    FROM pg_temp.load_count c
    ORDER BY array_position('{landslide_event,location,weather_window,weather_hour,pending_window}'::text[],
                            c.target);
END $$;

-- ===== watermark and keys =====

-- The newest last_edited among the reports loaded from a source (a catalog
-- file's name or the ArcGIS layer URL); NULL when nothing dated came from it.
-- extract.py --since takes it to read only what changed.
CREATE OR REPLACE FUNCTION source_watermark(p_source text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT last_edited FROM load_watermark WHERE source = p_source
$$;

-- What weather_hour's location_id would have as a foreign key: a location
-- with hours cannot go.
CREATE OR REPLACE FUNCTION location_keeps_its_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM weather_hour WHERE location_id = OLD.location_id) THEN
        RAISE EXCEPTION 'location % has hourly weather in weather_hour: delete those hours first', OLD.location_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE OR REPLACE TRIGGER location_keeps_its_hours BEFORE DELETE ON location
FOR EACH ROW EXECUTE FUNCTION location_keeps_its_hours();

-- ===== views =====

-- For people at psql.

-- The hourly rows in their old shapes, for queries written against version 2.
CREATE VIEW weather_data AS
SELECT location_id, observed_at, temperature_2m, relative_humidity_2m, precipitation, rain
FROM weather_hour;

-- One row per (place, hour, depth); a depth with neither value is no row.
CREATE VIEW soil AS
SELECT h.location_id, h.observed_at, d.depth_top_cm, d.depth_bottom_cm, d.temperature, d.moisture
FROM weather_hour h
CROSS JOIN LATERAL (VALUES
    (0::smallint, 7::smallint, h.soil_temperature_0_to_7cm, h.soil_moisture_0_to_7cm),
    (7::smallint, 28::smallint, h.soil_temperature_7_to_28cm, h.soil_moisture_7_to_28cm),
    (28::smallint, 100::smallint, h.soil_temperature_28_to_100cm, h.soil_moisture_28_to_100cm),
    (100::smallint, 255::smallint, h.soil_temperature_100_to_255cm, h.soil_moisture_100_to_255cm)
) AS d(depth_top_cm, depth_bottom_cm, temperature, moisture)
WHERE d.temperature IS NOT NULL OR d.moisture IS NOT NULL;

-- Every hourly row with its place and calendar parts: in UTC, and in the
-- place's own zone (NULL until the crawl has named it).
DO $$
BEGIN
    EXECUTE format($view$
CREATE VIEW hourly_weather AS
SELECT h.location_id,
       l.latitude,
       l.longitude,
       l.timezone,
       h.observed_at,
       (h.observed_at AT TIME ZONE 'UTC')::date AS utc_date,
       extract(hour FROM h.observed_at AT TIME ZONE 'UTC')::smallint AS utc_hour,
       h.observed_at AT TIME ZONE l.timezone AS local_time,
       (h.observed_at AT TIME ZONE l.timezone)::date AS local_date,
       extract(hour FROM h.observed_at AT TIME ZONE l.timezone)::smallint AS local_hour,
       extract(isodow FROM h.observed_at AT TIME ZONE l.timezone)::smallint AS local_iso_weekday,
       %s
FROM weather_hour h
JOIN location l ON l.location_id = h.location_id
    $view$, staging.columns_after('weather_hour', 'observed_at', 'h'));
END $$;

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
       wx.*
FROM weather_window w
JOIN landslide_event e ON e.landslide_event_id = w.landslide_event_id
JOIN location l ON l.location_id = w.location_id
CROSS JOIN LATERAL (
    SELECT count(*) AS hours_observed,
           sum(h.precipitation) AS precipitation_sum,
           sum(h.rain) AS rain_sum,
           round(avg(h.temperature_2m), 2) AS temperature_2m_mean,
           max(h.temperature_2m) AS temperature_2m_max,
           round(avg(h.relative_humidity_2m), 2) AS relative_humidity_2m_mean,
           max(h.soil_moisture_0_to_7cm) AS soil_moisture_0_to_7cm_max,
           max(h.soil_moisture_7_to_28cm) AS soil_moisture_7_to_28cm_max,
           max(h.soil_moisture_28_to_100cm) AS soil_moisture_28_to_100cm_max,
           max(h.soil_moisture_100_to_255cm) AS soil_moisture_100_to_255cm_max
    FROM weather_hour h
    WHERE h.location_id = w.location_id AND h.observed_at BETWEEN w.first_hour AND w.last_hour
) wx;

-- One row per landslide event with its day's weather (NULLs until the
-- event's day has been crawled). event_date and event_time are local to the
-- place; instant is UTC, and the event_hour_* columns are the weather of the
-- hour it falls in (NULL while the time or the zone is unknown).
-- landslide_type is landslide_category's version-2 name.
DO $$
BEGIN
    EXECUTE format($view$
CREATE VIEW event_weather_daily AS
SELECT e.catalog_id,
       e.event_date,
       e.event_time,
       e.time_text,
       e.hazard_type,
       e.landslide_category AS landslide_type,
       e.landslide_size,
       l.country,
       l.near,
       l.continent_code,
       l.latitude,
       l.longitude,
       l.elevation,
       %s,
       e.landslide_category,
       e.landslide_trigger,
       e.landslide_setting,
       e.title,
       e.last_edited,
       e.timezone,
       e.utc_offset,
       e.instant,
       h.observed_at AS event_hour,
       h.precipitation AS event_hour_precipitation,
       h.rain AS event_hour_rain,
       h.soil_moisture_0_to_7cm AS event_hour_soil_moisture_0_to_7cm
FROM landslide_event e
JOIN location l ON l.location_id = e.location_id
LEFT JOIN window_weather_daily f ON f.landslide_event_id = e.landslide_event_id AND f.is_event
LEFT JOIN weather_hour h ON h.location_id = e.location_id AND h.observed_at = date_trunc('hour', e.instant)
    $view$,
        staging.columns_after('window_weather_daily', 'elevation', 'f'));
END $$;

-- Training set: every crawled day labelled 'event' or 'non-event', same
-- features. catalog_id says which event a non-event day was sampled for.
DO $$
BEGIN
    EXECUTE format($view$
CREATE VIEW training_days AS
SELECT CASE WHEN f.is_event THEN 'event' ELSE 'non-event' END AS label,
       f.catalog_id,
       f.window_date,
       f.latitude,
       f.longitude,
       f.elevation,
       %s
FROM window_weather_daily f
    $view$,
        staging.columns_after('window_weather_daily', 'elevation', 'f'));
END $$;

-- ===== grants =====

-- Grants (ddl.sql creates the roles): renewed on every apply, since the
-- views and load_staging above are new objects each time.
GRANT USAGE ON SCHEMA staging TO vpe_loader;
GRANT SELECT, INSERT, DELETE ON staging.landslide_event, staging.weather_hourly, staging.pending_window TO vpe_loader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO vpe_loader, vpe_reader;
GRANT INSERT ON rejected_rows TO vpe_loader;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA staging FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION load_staging(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION load_staging(text) TO vpe_loader;

COMMIT;
