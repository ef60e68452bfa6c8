-- VPE warehouse schema: landslide events, the places they happened at, and the
-- hourly weather/soil there, plus staging and rejects for bulk loads.
--
-- Safe to apply any number of times, on an empty or a populated warehouse:
-- nothing here loses data. Tables are created only when missing; a later
-- change to an existing table goes after them as an idempotent statement
-- (ALTER ... ADD COLUMN IF NOT EXISTS, guarded DO blocks) together with a new
-- schema_version row. Version 3 moves a version-2 warehouse's rows over in
-- place (see "Upgrade from version 2" below).
--
-- Constraints are written once, here. load_staging() (dml.sql) reads the
-- CHECK and NOT NULL constraints from the catalog and applies them to staged
-- rows, so a row that breaks one is rejected with that constraint's name
-- instead of aborting the load.
--
-- Apply as the superuser (./bootstrap.sh migrate). The roles the components
-- connect as are created here without a password; bootstrap gives them one.

-- A re-apply would otherwise print a NOTICE for every existing object.
SET client_min_messages = warning;

BEGIN;

CREATE TABLE IF NOT EXISTS schema_version (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per coordinate pair (rounded to 6 decimals, about 0.1 m).
-- Places known only from the weather crawl have no country/near/continent;
-- elevation and time zone come from the weather API (the catalog has neither).
CREATE TABLE IF NOT EXISTS location (
    location_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    latitude       numeric(8,6) NOT NULL
        CONSTRAINT location_latitude_range CHECK (latitude BETWEEN -90 AND 90),
    longitude      numeric(9,6) NOT NULL
        CONSTRAINT location_longitude_range CHECK (longitude BETWEEN -180 AND 180),
    elevation      numeric(6,1)
        CONSTRAINT location_elevation_range CHECK (elevation BETWEEN -450 AND 8900),
    country        text,
    near           text,
    -- Two-letter continent code; 'NA' is North America, not a missing value.
    continent_code char(2)
        CONSTRAINT location_continent_code_known
        CHECK (continent_code IN ('AF', 'AN', 'AS', 'EU', 'NA', 'OC', 'SA')),
    CONSTRAINT location_coordinates_key UNIQUE (latitude, longitude)
);

-- One row per catalog id: the newest version of the report (older versions
-- are in landslide_event_history). Dates and times are the catalog's LOCAL
-- ones; the version-3 columns below add the place's zone and the UTC instant.
CREATE TABLE IF NOT EXISTS landslide_event (
    landslide_event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    catalog_id     text NOT NULL
        CONSTRAINT landslide_event_catalog_id_not_blank CHECK (btrim(catalog_id) <> ''),
    source         text NOT NULL,
    location_id    bigint NOT NULL REFERENCES location,
    event_date     date NOT NULL
        CONSTRAINT landslide_event_event_date_range
        CHECK (event_date >= '1900-01-01' AND event_date < '2100-01-01'),
    event_time     time,
    time_text      text,
    hazard_type    text,
    landslide_category text,
    landslide_size text,
    loaded_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT landslide_event_catalog_id_key UNIQUE (catalog_id)
);

-- One row per crawled day: the event's own day (is_event) or the same place
-- one year earlier (the non-event sample drawn for that event). The window
-- spans first_hour..last_hour, the hours the crawl returned, so the views need
-- no assumption about the time zone the crawler asked for.
CREATE TABLE IF NOT EXISTS weather_window (
    weather_window_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    landslide_event_id bigint NOT NULL REFERENCES landslide_event,
    is_event           boolean NOT NULL,
    location_id        bigint NOT NULL REFERENCES location,
    window_date        date NOT NULL,
    first_hour         timestamptz NOT NULL,
    last_hour          timestamptz NOT NULL,
    CONSTRAINT weather_window_hours_ordered CHECK (first_hour <= last_hour),
    CONSTRAINT weather_window_event_kind_key UNIQUE (landslide_event_id, is_event)
);

-- Hourly fact, one row per (place, hour): the four weather variables and soil
-- temperature and moisture at four depths. observed_at is a true UTC instant.
-- Column names are the Open-Meteo variable names; scales keep one digit more
-- than the API sends. (Calendar parts: the view hourly_weather.)
-- location_id is a location's, but not a declared foreign key: its per-row
-- check (a lookup and a row lock per hour) cost 40% of a load. The loader
-- writes only ids it has just looked up in location, and a location with
-- hours cannot be deleted (trigger location_keeps_its_hours, dml.sql).
CREATE TABLE IF NOT EXISTS weather_hour (
    location_id          bigint NOT NULL,
    observed_at          timestamptz NOT NULL
        CONSTRAINT weather_hour_observed_at_range
        CHECK (observed_at >= '1900-01-01 00:00+00' AND observed_at < '2100-01-01 00:00+00'),
    temperature_2m       numeric(5,2)                    -- °C
        CONSTRAINT weather_hour_temperature_2m_range CHECK (temperature_2m BETWEEN -90 AND 65),
    relative_humidity_2m numeric(5,2)                    -- %
        CONSTRAINT weather_hour_relative_humidity_2m_range CHECK (relative_humidity_2m BETWEEN 0 AND 100),
    precipitation        numeric(6,2)                    -- mm in the hour
        CONSTRAINT weather_hour_precipitation_range CHECK (precipitation BETWEEN 0 AND 500),
    rain                 numeric(6,2)                    -- mm in the hour
        CONSTRAINT weather_hour_rain_range CHECK (rain BETWEEN 0 AND 500),
    soil_temperature_0_to_7cm     numeric(5,2)           -- °C
        CONSTRAINT weather_hour_soil_temperature_0_to_7cm_range CHECK (soil_temperature_0_to_7cm BETWEEN -90 AND 90),
    soil_temperature_7_to_28cm    numeric(5,2)
        CONSTRAINT weather_hour_soil_temperature_7_to_28cm_range CHECK (soil_temperature_7_to_28cm BETWEEN -90 AND 90),
    soil_temperature_28_to_100cm  numeric(5,2)
        CONSTRAINT weather_hour_soil_temperature_28_to_100cm_range CHECK (soil_temperature_28_to_100cm BETWEEN -90 AND 90),
    soil_temperature_100_to_255cm numeric(5,2)
        CONSTRAINT weather_hour_soil_temperature_100_to_255cm_range CHECK (soil_temperature_100_to_255cm BETWEEN -90 AND 90),
    soil_moisture_0_to_7cm        numeric(5,4)           -- m³/m³
        CONSTRAINT weather_hour_soil_moisture_0_to_7cm_range CHECK (soil_moisture_0_to_7cm BETWEEN 0 AND 1),
    soil_moisture_7_to_28cm       numeric(5,4)
        CONSTRAINT weather_hour_soil_moisture_7_to_28cm_range CHECK (soil_moisture_7_to_28cm BETWEEN 0 AND 1),
    soil_moisture_28_to_100cm     numeric(5,4)
        CONSTRAINT weather_hour_soil_moisture_28_to_100cm_range CHECK (soil_moisture_28_to_100cm BETWEEN 0 AND 1),
    soil_moisture_100_to_255cm    numeric(5,4)
        CONSTRAINT weather_hour_soil_moisture_100_to_255cm_range CHECK (soil_moisture_100_to_255cm BETWEEN 0 AND 1),
    CONSTRAINT weather_hour_pkey PRIMARY KEY (location_id, observed_at)
);

-- Everything a load could not take, with the raw values and why.
-- (source, row_key, reason) is the natural key: re-running a load with the
-- same bad input records it once.
CREATE TABLE IF NOT EXISTS rejected_rows (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text NOT NULL,
    row_key     text NOT NULL,
    raw         jsonb NOT NULL,
    reason      text NOT NULL,
    run_id      text,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rejected_rows_natural_key UNIQUE (source, row_key, reason)
);

-- Staging: filled by COPY (tasks/ingestion/load.py), emptied by
-- load_staging(run_id). Unlogged: no WAL for rows that live only until the
-- merge; after a crash they are gone and the run is simply loaded again.
-- No constraints on purpose: anything the file holds must reach the merge so
-- that it is either loaded or rejected with a reason.
CREATE SCHEMA IF NOT EXISTS staging;

CREATE UNLOGGED TABLE IF NOT EXISTS staging.landslide_event (
    run_id         text,
    source         text,
    row_number     integer,
    catalog_id     text,
    event_date     date,
    event_time     time,
    time_text      text,
    country        text,
    near           text,
    continent_code text,
    hazard_type    text,
    landslide_category text,
    landslide_size text,
    latitude       double precision,
    longitude      double precision,
    elevation      double precision
);

-- Measurements and coordinates as numeric: COPY parses the file's text
-- straight into the tables' type (a double in between costs a second
-- conversion per value).
CREATE UNLOGGED TABLE IF NOT EXISTS staging.weather_hourly (
    run_id                        text,
    catalog_id                    text,
    is_event                      boolean,
    latitude                      numeric,
    longitude                     numeric,
    elevation                     numeric,
    window_date                   date,
    observed_at                   timestamptz,
    temperature_2m                numeric,
    relative_humidity_2m          numeric,
    precipitation                 numeric,
    rain                          numeric,
    soil_temperature_0_to_7cm     numeric,
    soil_temperature_7_to_28cm    numeric,
    soil_temperature_28_to_100cm  numeric,
    soil_temperature_100_to_255cm numeric,
    soil_moisture_0_to_7cm        numeric,
    soil_moisture_7_to_28cm       numeric,
    soil_moisture_28_to_100cm     numeric,
    soil_moisture_100_to_255cm    numeric
);

INSERT INTO schema_version (version, description)
VALUES (1, 'star schema with natural keys, staging, rejected_rows')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Version 3: one row per place-hour, true UTC event instants, report
-- versions, watermarks, pending windows, least-privilege roles.

-- Upgrade from version 2 (hourly rows in weather_data + soil + datetime):
-- every hour moves into weather_hour, then the old tables go. Runs once; the
-- views over the old tables (and the staging columns) are rebuilt by dml.sql
-- right after.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('public.weather_data') AND relkind = 'r') THEN
        DROP VIEW IF EXISTS training_days, event_weather_daily, window_weather_daily,
            staging.soil_candidate, staging.weather_candidate, staging.landslide_event_candidate;
        INSERT INTO weather_hour
        SELECT w.location_id, d.instant, w.temperature_2m, w.relative_humidity_2m, w.precipitation, w.rain,
               max(s.temperature) FILTER (WHERE s.depth_top_cm = 0), max(s.temperature) FILTER (WHERE s.depth_top_cm = 7),
               max(s.temperature) FILTER (WHERE s.depth_top_cm = 28), max(s.temperature) FILTER (WHERE s.depth_top_cm = 100),
               max(s.moisture) FILTER (WHERE s.depth_top_cm = 0), max(s.moisture) FILTER (WHERE s.depth_top_cm = 7),
               max(s.moisture) FILTER (WHERE s.depth_top_cm = 28), max(s.moisture) FILTER (WHERE s.depth_top_cm = 100)
        FROM weather_data w
        JOIN datetime d ON d.datetime_id = w.datetime_id
        LEFT JOIN soil s ON s.weather_id = w.weather_id
        GROUP BY w.weather_id, d.instant;
        DROP TABLE soil, weather_data;
        -- The event's instant was its local date and time read as UTC: the
        -- version-3 columns below replace it.
        ALTER TABLE landslide_event DROP COLUMN datetime_id;
        DROP TABLE datetime;
        ALTER TABLE landslide_event RENAME COLUMN landslide_type TO landslide_category;
        ALTER TABLE staging.landslide_event RENAME COLUMN landslide_type TO landslide_category;
        ALTER TABLE staging.weather_hourly
            ALTER latitude TYPE numeric, ALTER longitude TYPE numeric, ALTER elevation TYPE numeric,
            ALTER temperature_2m TYPE numeric, ALTER relative_humidity_2m TYPE numeric,
            ALTER precipitation TYPE numeric, ALTER rain TYPE numeric,
            ALTER soil_temperature_0_to_7cm TYPE numeric, ALTER soil_temperature_7_to_28cm TYPE numeric,
            ALTER soil_temperature_28_to_100cm TYPE numeric, ALTER soil_temperature_100_to_255cm TYPE numeric,
            ALTER soil_moisture_0_to_7cm TYPE numeric, ALTER soil_moisture_7_to_28cm TYPE numeric,
            ALTER soil_moisture_28_to_100cm TYPE numeric, ALTER soil_moisture_100_to_255cm TYPE numeric;
        -- The categories become codes in version 5 below.
    END IF;
END $$;

-- The zone Open-Meteo named for the place (crawl's timezone=auto), e.g.
-- 'America/Los_Angeles'.
ALTER TABLE location ADD COLUMN IF NOT EXISTS timezone text;

-- The report as the catalog gives it (contract C1). event_date and
-- event_time are the place's local calendar day and clock time; timezone is
-- the place's zone once its weather is loaded; utc_offset is that zone's
-- offset on that day (at the event's time, else at noon) from the tz
-- database; instant is the true UTC instant (NULL while the time or the zone
-- is unknown).
ALTER TABLE landslide_event
    ADD COLUMN IF NOT EXISTS last_edited timestamptz,
    ADD COLUMN IF NOT EXISTS title text,
    ADD COLUMN IF NOT EXISTS country text,
    ADD COLUMN IF NOT EXISTS country_code text,
    ADD COLUMN IF NOT EXISTS admin_division text,
    ADD COLUMN IF NOT EXISTS near text,
    ADD COLUMN IF NOT EXISTS continent_code char(2)
        CONSTRAINT landslide_event_continent_code_known
        CHECK (continent_code IN ('AF', 'AN', 'AS', 'EU', 'NA', 'OC', 'SA')),
    ADD COLUMN IF NOT EXISTS location_accuracy text,
    ADD COLUMN IF NOT EXISTS landslide_trigger text,
    ADD COLUMN IF NOT EXISTS landslide_setting text,
    ADD COLUMN IF NOT EXISTS fatalities integer
        CONSTRAINT landslide_event_fatalities_range CHECK (fatalities >= 0),
    ADD COLUMN IF NOT EXISTS injuries integer
        CONSTRAINT landslide_event_injuries_range CHECK (injuries >= 0),
    ADD COLUMN IF NOT EXISTS source_link text,
    ADD COLUMN IF NOT EXISTS timezone text,
    ADD COLUMN IF NOT EXISTS utc_offset interval GENERATED ALWAYS AS (
        (event_date + coalesce(event_time, time '12:00'))
        - ((event_date + coalesce(event_time, time '12:00')) AT TIME ZONE timezone AT TIME ZONE 'UTC')) STORED,
    ADD COLUMN IF NOT EXISTS instant timestamptz GENERATED ALWAYS AS ((event_date + event_time) AT TIME ZONE timezone) STORED,
    ADD COLUMN IF NOT EXISTS updated_at timestamptz;

-- Each replaced version of a report, as it was stored, and when and by which
-- run it was replaced.
CREATE TABLE IF NOT EXISTS landslide_event_history (
    history_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    landslide_event_id bigint NOT NULL REFERENCES landslide_event,
    catalog_id         text NOT NULL,
    last_edited        timestamptz,
    version            jsonb NOT NULL,
    replaced_at        timestamptz NOT NULL DEFAULT now(),
    replaced_by_run    text
);

-- Per source (a catalog file's name or the ArcGIS layer URL), the newest
-- last_edited among the reports loaded from it: source_watermark() (dml.sql).
CREATE TABLE IF NOT EXISTS load_watermark (
    source      text PRIMARY KEY,
    last_edited timestamptz NOT NULL,
    advanced_at timestamptz NOT NULL DEFAULT now(),
    run_id      text
);

-- Windows the archive could not serve yet (crawl's pending_windows.csv):
-- waiting, not failed. A load that brings the window's hours removes it.
CREATE TABLE IF NOT EXISTS pending_window (
    landslide_event_id bigint NOT NULL REFERENCES landslide_event,
    is_event           boolean NOT NULL,
    latitude           numeric(8,6) NOT NULL,
    longitude          numeric(9,6) NOT NULL,
    window_date        date NOT NULL,
    first_seen         timestamptz NOT NULL DEFAULT now(),
    last_checked       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pending_window_pkey PRIMARY KEY (landslide_event_id, is_event)
);

ALTER TABLE staging.landslide_event
    ADD COLUMN IF NOT EXISTS last_edited timestamptz,
    ADD COLUMN IF NOT EXISTS title text,
    ADD COLUMN IF NOT EXISTS country_code text,
    ADD COLUMN IF NOT EXISTS admin_division text,
    ADD COLUMN IF NOT EXISTS location_accuracy text,
    ADD COLUMN IF NOT EXISTS landslide_trigger text,
    ADD COLUMN IF NOT EXISTS landslide_setting text,
    ADD COLUMN IF NOT EXISTS fatalities integer,
    ADD COLUMN IF NOT EXISTS injuries integer,
    ADD COLUMN IF NOT EXISTS source_link text;

ALTER TABLE staging.weather_hourly ADD COLUMN IF NOT EXISTS timezone text;

CREATE UNLOGGED TABLE IF NOT EXISTS staging.pending_window (
    run_id      text,
    catalog_id  text,
    is_event    boolean,
    latitude    double precision,
    longitude   double precision,
    window_date date
);

-- Roles (cluster-wide; bootstrap gives them LOGIN and a password):
--   vpe_loader  the tasks' VPE_WAREHOUSE_DSN: stages rows and calls load_staging
--   vpe_reader  ./bootstrap.sh psql: reads everything, creates tables in schema scratch
--   (version 6 adds vpe_executor: the executor's workspace store)
-- No one else may connect to this database (Airflow's role included); the
-- grants on tables and functions are renewed at the end of dml.sql.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY '{vpe_loader,vpe_reader}'::text[] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        END IF;
    END LOOP;
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO vpe_loader, vpe_reader', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO vpe_reader', current_database());
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA IF NOT EXISTS scratch AUTHORIZATION vpe_reader;

INSERT INTO schema_version (version, description)
VALUES (3, 'one row per place-hour (weather_hour), local and UTC event times, report versions, '
           'watermarks, pending windows, least-privilege roles')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Version 4: the catalog's key is catalog_id everywhere, staging included
-- (it was event_id there, after the current export's column).

-- Staging columns of version 3 or older: renamed in place, once. Staged rows
-- live only within a load, but a leftover of a crashed one keeps its values.
DO $$
DECLARE
    staging_table text;
BEGIN
    FOREACH staging_table IN ARRAY '{landslide_event,weather_hourly,pending_window}'::text[] LOOP
        IF EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'staging' AND table_name = staging_table AND column_name = 'event_id') THEN
            EXECUTE format('ALTER TABLE staging.%I RENAME COLUMN event_id TO catalog_id', staging_table);
        END IF;
    END LOOP;
END $$;

-- The loads' rejects of version 3 or older, keyed and explained by the old
-- name: renamed too, so that the same bad row loaded again is recognised
-- (source, row_key and reason are rejected_rows' natural key).
UPDATE rejected_rows
SET row_key = regexp_replace(row_key, '^event_id ', 'catalog_id '),
    reason = regexp_replace(reason, '^(repeats )?event_id ', '\1catalog_id ')
WHERE row_key LIKE 'event_id %'
  AND NOT EXISTS (SELECT 1 FROM schema_version WHERE version = 4);

INSERT INTO schema_version (version, description)
VALUES (4, 'the catalog key is catalog_id in staging and in the loads'' rejects')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Version 5: the catalog's categorical values are coded one way, by extract
-- and here (tasks/ingestion/codes.py says how, and writes the block below).

-- An older spelling's code -> the current export's code, per column. Only
-- the aliases: every other value is coded by the rule alone.
CREATE TABLE IF NOT EXISTS code_alias (
    column_name text NOT NULL,
    value       text NOT NULL,
    code        text NOT NULL,
    CONSTRAINT code_alias_pkey PRIMARY KEY (column_name, value)
);

-- catalog_code(column, value) lives here, not in dml.sql: the recoding below
-- needs it. The aliases as they were before this apply tell whether they
-- changed.
CREATE TEMP TABLE previous_code_alias ON COMMIT DROP AS TABLE code_alias;
-- BEGIN codes (written by `python3 tasks/ingestion/codes.py --write-ddl` from its ALIASES; do not edit)
INSERT INTO code_alias (column_name, value, code) VALUES
    ('landslide_category', 'rockfall', 'rock_fall')
ON CONFLICT (column_name, value) DO UPDATE SET code = excluded.code;
DELETE FROM code_alias WHERE (column_name, value) NOT IN (VALUES
    ('landslide_category', 'rockfall'));

CREATE OR REPLACE FUNCTION catalog_code(p_column text, p_value text) RETURNS text
LANGUAGE sql STABLE AS $code$
    SELECT coalesce(a.code, nullif(r.code, ''))
    FROM (SELECT translate(btrim(regexp_replace(
                               normalize(regexp_replace(normalize(p_value, NFKD), '[\u0300-\u036f]', '', 'g'), NFC),
                               '[\x01-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+', '_', 'g'), '_'),
                           'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') AS code) r
    LEFT JOIN code_alias a ON a.column_name = p_column AND a.value = r.code
$code$;

-- Stored values that are not codes yet are recoded, on reaching version 5
-- (a warehouse upgraded from version 2 by version 3 or 4 kept 'rockfall' and
-- 'mud_debris_flow_x_') and whenever the aliases change; the replaced
-- versions in landslide_event_history keep theirs.
UPDATE landslide_event
SET hazard_type = catalog_code('hazard_type', hazard_type),
    landslide_category = catalog_code('landslide_category', landslide_category),
    landslide_trigger = catalog_code('landslide_trigger', landslide_trigger),
    landslide_size = catalog_code('landslide_size', landslide_size),
    landslide_setting = catalog_code('landslide_setting', landslide_setting)
WHERE (hazard_type, landslide_category, landslide_trigger, landslide_size, landslide_setting)
      IS DISTINCT FROM (catalog_code('hazard_type', hazard_type),
                        catalog_code('landslide_category', landslide_category),
                        catalog_code('landslide_trigger', landslide_trigger),
                        catalog_code('landslide_size', landslide_size),
                        catalog_code('landslide_setting', landslide_setting))
  AND (NOT EXISTS (SELECT 1 FROM schema_version WHERE version = 5)
       OR EXISTS ((TABLE code_alias EXCEPT TABLE previous_code_alias)
                  UNION ALL (TABLE previous_code_alias EXCEPT TABLE code_alias)));
-- END codes

INSERT INTO schema_version (version, description)
VALUES (5, 'one coding of the catalog''s categorical values (code_alias, catalog_code), stored values recoded')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Version 6: the workspace store. The files of the executor's workspaces
-- (buffer/<workspace>), which executor replicas on several hosts share:
-- executor.py's WorkspaceStore reads and writes them as vpe_executor
-- (VPE_EXECUTOR_WORKSPACE_STORE), a role with rights on this schema only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'vpe_executor') THEN
        CREATE ROLE vpe_executor NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO vpe_executor', current_database());
END $$;
CREATE SCHEMA IF NOT EXISTS workspace;

CREATE TABLE IF NOT EXISTS workspace.file (
    workspace  text        NOT NULL,
    path       text        NOT NULL,  -- relative to the workspace, '/' between folders
    sha256     text        NOT NULL,  -- of content: a replica fetches only files whose content it lacks
    mode       integer     NOT NULL,  -- permission bits
    content    bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),  -- retention: workspaces untouched for keep_days go
    CONSTRAINT file_pkey PRIMARY KEY (workspace, path)
);

GRANT USAGE ON SCHEMA workspace TO vpe_executor;
GRANT SELECT, INSERT, UPDATE, DELETE ON workspace.file TO vpe_executor;

INSERT INTO schema_version (version, description)
VALUES (6, 'the workspace store (workspace.file) and its role vpe_executor')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Version 7: the crawl's answer cache and its daily call count, shared by
-- every crawl on every host (tasks/ingestion/crawl.py; they were files in
-- each executor's buffer/cache, which the crawl imports once). An answer is
-- quota already spent: nothing here is ever deleted by the crawl.

CREATE SCHEMA IF NOT EXISTS crawl;

-- One Open-Meteo answer per archive endpoint (host:port/path of the URL
-- asked: a stand-in's synthetic answers never stand in for the real
-- archive's), requested timezone (crawl's --timezone), place and day: the
-- place's elevation, utc_offset_seconds, zone name and the day's 24 hours.
CREATE TABLE IF NOT EXISTS crawl.answer (
    source     text NOT NULL,
    timezone   text NOT NULL,
    latitude   numeric(8,6) NOT NULL,
    longitude  numeric(9,6) NOT NULL,
    day        date NOT NULL,
    answer     jsonb NOT NULL,
    synthetic  boolean NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT answer_pkey PRIMARY KEY (source, timezone, latitude, longitude, day)
);

-- Weighted calls (Open-Meteo's weighting) spent per endpoint and UTC day, by
-- all crawls together: the daily limit is checked and counted in one
-- statement (crawl.py's Cache.spend).
CREATE TABLE IF NOT EXISTS crawl.api_calls (
    source         text NOT NULL,
    day            date NOT NULL,
    weighted_calls double precision NOT NULL
        CONSTRAINT api_calls_weighted_calls_positive CHECK (weighted_calls >= 0),
    CONSTRAINT api_calls_pkey PRIMARY KEY (source, day)
);

-- The loader (the tasks' role) reads and adds answers and counts calls; it
-- cannot change or delete an answer. The reader reads both.
GRANT USAGE ON SCHEMA crawl TO vpe_loader, vpe_reader;
GRANT SELECT, INSERT ON crawl.answer, crawl.api_calls TO vpe_loader;
GRANT UPDATE (weighted_calls) ON crawl.api_calls TO vpe_loader;
GRANT SELECT ON crawl.answer, crawl.api_calls TO vpe_reader;

INSERT INTO schema_version (version, description)
VALUES (7, 'the crawl''s answer cache and daily call count (schema crawl), shared by every host')
ON CONFLICT (version) DO NOTHING;

COMMIT;
