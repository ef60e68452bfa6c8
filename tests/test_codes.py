"""One coding of the catalog's categorical values: extract's (tasks/ingestion/codes.py) and the warehouse's
(catalog_code() in ddl.sql, the block codes.py writes) give the same code for awkward values, on a real
PostgreSQL; stored values that are not codes yet are recoded by the next apply."""
from __future__ import annotations

import datetime as dt
import sys

from conftest import ROOT, bootstrap
from test_warehouse import event, load, warehouse  # noqa: F401 (fixture)

sys.path.insert(0, str(ROOT / "tasks" / "ingestion"))
from codes import ALIASES, CODED_COLUMNS, code, ddl_block  # noqa: E402 (the steps' own module)

AWKWARD = [
    "Rockfall", "rockfall", "Rock fall", "ROCK_FALL", "Mud/Debris flow (x)", "Mud/Debris flow (x).",
    "Debris  Flow", "  debris flow  ", "Debris-Flow", "Very_large", "downpour ", "Snowfall/snowmelt",
    "Éboulement rocheux", "Glissement de terrain – coulée", "Ødegaard", "Mud\u00a0slide", "Mud\tslide\n",
    "ﬂash ﬂood²", "lahar!!!", "[unknown]", "(x)", "50% slope", "'quoted'", 'say "hi"', "back\\slash",
    "under__score", "___", "?", "", "日本 の 地すべり", "Caña-Brava", "İzmir", "a.b.c", "tropical_cyclone",
]


def test_ddl_sql_holds_the_block_codes_py_writes() -> None:
    assert ddl_block() in (ROOT / "ddl.sql").read_text(), (
        "ddl.sql's codes block is not what tasks/ingestion/codes.py writes: run "
        "`python3 tasks/ingestion/codes.py --write-ddl`")


def test_examples_of_the_rule() -> None:
    assert code("Rockfall", "landslide_category") == "rock_fall"
    assert code("Rockfall", "landslide_trigger") == "rockfall", "an alias belongs to its column"
    assert code("Mud/Debris flow (x)") == code("Mud/Debris  flow (x).") == "mud_debris_flow_x"
    assert code("Éboulement rocheux") == "eboulement_rocheux"
    assert code("日本 の 地すべり") == "日本_の_地すべり", "an unknown value is coded, not lost"
    assert code("?") == ""


def test_an_alias_leads_to_a_code_the_rule_keeps() -> None:
    for column, table in ALIASES.items():
        assert column in CODED_COLUMNS
        for value, target in table.items():
            assert code(value) == value and code(target, column) == target


def test_the_warehouse_codes_awkward_values_as_extract_does(warehouse) -> None:  # noqa: F811
    conn, _ = warehouse
    for column in CODED_COLUMNS:
        stored = conn.execute("SELECT v, catalog_code(%s, v) FROM unnest(%s::text[]) v", (column, AWKWARD)).fetchall()
        assert stored == [(value, code(value, column) or None) for value in AWKWARD]


def test_the_next_apply_recodes_what_an_older_version_stored(warehouse) -> None:  # noqa: F811
    """A warehouse upgraded by version 3 of ddl.sql kept `rockfall`, `mud_debris_flow_x_` and the like."""
    conn, env = warehouse
    load(conn, "run", [event("1", dt.date(2019, 3, 10), 1.0, 1.0), event("2", dt.date(2019, 3, 11), 2.0, 2.0)])
    conn.execute("DELETE FROM schema_version WHERE version = 5")
    conn.execute("UPDATE landslide_event SET landslide_category = CASE catalog_id WHEN '1' THEN 'rockfall' "
                 "ELSE 'mud_debris_flow_x_' END, landslide_size = 'Very_large', landslide_trigger = 'Rain'")
    stored_before = conn.execute("SELECT landslide_event_id, loaded_at, updated_at FROM landslide_event "
                                 "ORDER BY 1").fetchall()

    bootstrap("migrate", env=env)

    assert conn.execute("SELECT catalog_id, landslide_category, landslide_size, landslide_trigger, hazard_type "
                        "FROM landslide_event ORDER BY 1").fetchall() == [
        ("1", "rock_fall", "very_large", "rain", "landslide"),
        ("2", "mud_debris_flow_x", "very_large", "rain", "landslide")]
    assert conn.execute("SELECT landslide_event_id, loaded_at, updated_at FROM landslide_event ORDER BY 1"
                        ).fetchall() == stored_before, "recoded in place, not reloaded"
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (7,)
    assert conn.execute("SELECT column_name, value, code FROM code_alias").fetchall() == [
        ("landslide_category", "rockfall", "rock_fall")]


def test_the_next_apply_recodes_when_the_aliases_change_and_else_leaves_stored_values_alone(warehouse) -> None:  # noqa: F811
    conn, env = warehouse
    load(conn, "run", [event("1", dt.date(2019, 3, 10), 1.0, 1.0, landslide_category="rockfall"),
                       event("2", dt.date(2019, 3, 11), 2.0, 2.0, landslide_category="Landslide")])
    bootstrap("migrate", env=env)
    assert conn.execute("SELECT landslide_category FROM landslide_event ORDER BY catalog_id").fetchall() == [
        ("rockfall",), ("Landslide",)], "stored as staged; nothing to recode while the aliases stay"
    conn.execute("DELETE FROM code_alias")  # as before the alias was added

    bootstrap("migrate", env=env)

    assert conn.execute("SELECT landslide_category FROM landslide_event ORDER BY catalog_id").fetchall() == [
        ("rock_fall",), ("landslide",)]

