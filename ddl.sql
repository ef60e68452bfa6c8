-- VPE warehouse schema: star schema for landslide events and the hourly
-- weather/soil around them, plus staging and rejects for bulk loads.
--
-- Safe to apply any number of times, on an empty or a populated warehouse:
-- nothing here drops or rewrites data. Tables are created only when missing;
-- a later change to an existing table goes at the end as an idempotent
-- statement (ALTER ... ADD COLUMN IF NOT EXISTS, guarded DO blocks) together
-- with a new schema_version row.
--
-- Constraints are written once, here. load_staging() (dml.sql) reads the
-- CHECK and NOT NULL constraints from the catalog and applies them to staged
-- rows, so a row that breaks one is rejected with that constraint's name
-- instead of aborting the load.

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
-- elevation comes from the weather API (the catalog has none).
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

-- One row per instant. The calendar parts are derived (in UTC), so they can
-- never disagree with the instant.
CREATE TABLE IF NOT EXISTS datetime (
    datetime_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instant     timestamptz NOT NULL
        CONSTRAINT datetime_instant_range
        CHECK (instant >= '1900-01-01 00:00+00' AND instant < '2100-01-01 00:00+00'),
    date        date GENERATED ALWAYS AS ((instant AT TIME ZONE 'UTC')::date) STORED,
    year        smallint GENERATED ALWAYS AS (extract(year FROM instant AT TIME ZONE 'UTC')) STORED,
    month       smallint GENERATED ALWAYS AS (extract(month FROM instant AT TIME ZONE 'UTC')) STORED
        CONSTRAINT datetime_month_range CHECK (month BETWEEN 1 AND 12),
    day         smallint GENERATED ALWAYS AS (extract(day FROM instant AT TIME ZONE 'UTC')) STORED
        CONSTRAINT datetime_day_range CHECK (day BETWEEN 1 AND 31),
    hour        smallint GENERATED ALWAYS AS (extract(hour FROM instant AT TIME ZONE 'UTC')) STORED
        CONSTRAINT datetime_hour_range CHECK (hour BETWEEN 0 AND 23),
    iso_weekday smallint GENERATED ALWAYS AS (extract(isodow FROM instant AT TIME ZONE 'UTC')) STORED
        CONSTRAINT datetime_iso_weekday_range CHECK (iso_weekday BETWEEN 1 AND 7),
    CONSTRAINT datetime_instant_key UNIQUE (instant)
);

-- One row per catalog id. The catalog's times carry no time zone and are
-- mostly missing: event_time is NULL when unknown (time_text keeps free text
-- such as 'night'), and datetime_id then points at the event day's 00:00 UTC.
CREATE TABLE IF NOT EXISTS landslide_event (
    landslide_event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    catalog_id     text NOT NULL
        CONSTRAINT landslide_event_catalog_id_not_blank CHECK (btrim(catalog_id) <> ''),
    source         text NOT NULL,
    location_id    bigint NOT NULL REFERENCES location,
    datetime_id    bigint NOT NULL REFERENCES datetime,
    event_date     date NOT NULL
        CONSTRAINT landslide_event_event_date_range
        CHECK (event_date >= '1900-01-01' AND event_date < '2100-01-01'),
    event_time     time,
    time_text      text,
    hazard_type    text,
    landslide_type text,
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

-- Hourly fact, one row per (location, instant). Column names are the
-- Open-Meteo variable names; scales keep one digit more than the API sends.
CREATE TABLE IF NOT EXISTS weather_data (
    weather_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    location_id          bigint NOT NULL REFERENCES location,
    datetime_id          bigint NOT NULL REFERENCES datetime,
    temperature_2m       numeric(5,2)                    -- °C
        CONSTRAINT weather_data_temperature_2m_range CHECK (temperature_2m BETWEEN -90 AND 65),
    relative_humidity_2m numeric(5,2)                    -- %
        CONSTRAINT weather_data_relative_humidity_2m_range CHECK (relative_humidity_2m BETWEEN 0 AND 100),
    precipitation        numeric(6,2)                    -- mm in the hour
        CONSTRAINT weather_data_precipitation_range CHECK (precipitation BETWEEN 0 AND 500),
    rain                 numeric(6,2)                    -- mm in the hour
        CONSTRAINT weather_data_rain_range CHECK (rain BETWEEN 0 AND 500),
    CONSTRAINT weather_data_location_instant_key UNIQUE (location_id, datetime_id)
);

-- One row per (weather row, depth); a depth with neither value is not stored.
CREATE TABLE IF NOT EXISTS soil (
    weather_id      bigint   NOT NULL REFERENCES weather_data,
    depth_top_cm    smallint NOT NULL,
    depth_bottom_cm smallint NOT NULL,
    temperature     numeric(5,2)                         -- °C
        CONSTRAINT soil_temperature_range CHECK (temperature BETWEEN -90 AND 90),
    moisture        numeric(5,4)                         -- m³/m³
        CONSTRAINT soil_moisture_range CHECK (moisture BETWEEN 0 AND 1),
    CONSTRAINT soil_depth_known CHECK ((depth_top_cm, depth_bottom_cm) IN ((0, 7), (7, 28), (28, 100), (100, 255))),
    PRIMARY KEY (weather_id, depth_top_cm)
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
    event_id       text,
    event_date     date,
    event_time     time,
    time_text      text,
    country        text,
    near           text,
    continent_code text,
    hazard_type    text,
    landslide_type text,
    landslide_size text,
    latitude       double precision,
    longitude      double precision,
    elevation      double precision
);

CREATE UNLOGGED TABLE IF NOT EXISTS staging.weather_hourly (
    run_id                        text,
    event_id                      text,
    is_event                      boolean,
    latitude                      double precision,
    longitude                     double precision,
    elevation                     double precision,
    window_date                   date,
    observed_at                   timestamptz,
    temperature_2m                double precision,
    relative_humidity_2m          double precision,
    precipitation                 double precision,
    rain                          double precision,
    soil_temperature_0_to_7cm     double precision,
    soil_temperature_7_to_28cm    double precision,
    soil_temperature_28_to_100cm  double precision,
    soil_temperature_100_to_255cm double precision,
    soil_moisture_0_to_7cm        double precision,
    soil_moisture_7_to_28cm       double precision,
    soil_moisture_28_to_100cm     double precision,
    soil_moisture_100_to_255cm    double precision
);

INSERT INTO schema_version (version, description)
VALUES (1, 'star schema with natural keys, staging, rejected_rows')
ON CONFLICT (version) DO NOTHING;

COMMIT;
