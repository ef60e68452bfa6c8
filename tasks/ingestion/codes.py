#!/usr/bin/env python3
"""codes: how the catalog's categorical values become codes, written once for extract and the warehouse.

hazard_type, landslide_category, landslide_trigger, landslide_size and
landslide_setting are coded by one rule: letters lose their accents (Unicode
NFKD, then the combining diacritical marks U+0300-U+036F go, then NFC
composes what is left: 'ﬁ' -> fi, 'べ' stays), every run of
ASCII characters other than letters and digits (blanks, punctuation, control
characters) becomes one `_`, `_` at either end goes, and ASCII letters become
lowercase; other characters are kept as they are. 'Mud/Debris  flow (x).' ->
mud_debris_flow_x, 'Éboulement' -> eboulement. Then ALIASES: a code the rule
gives for an older spelling -> the current export's code. Any other value is
coded by the rule alone: the catalog is open, nothing is rejected for being
unknown.

extract.py codes with code() below. The warehouse codes with catalog_code()
(ddl.sql), with which an apply recodes the stored values that are not codes
yet: on reaching schema version 5, and whenever the aliases change. Its
aliases (the table code_alias) and its patterns are the block of ddl.sql
that `python3 tasks/ingestion/codes.py --write-ddl` writes from this module;
tests/test_codes.py checks that block against this module and both codings
against each other on awkward values.
"""
from __future__ import annotations

import argparse
import re
import string
import sys
import unicodedata
from pathlib import Path

CODED_COLUMNS = ("hazard_type", "landslide_category", "landslide_trigger", "landslide_size", "landslide_setting")
# The older spelling's code -> the current export's, per column.
ALIASES = {
    "landslide_category": {"rockfall": "rock_fall"},
}
# Written so that Python's re and PostgreSQL's regular expressions read them alike.
MARKS = "[\\u0300-\\u036f]"
SEPARATORS = "[\\x01-\\x2f\\x3a-\\x40\\x5b-\\x60\\x7b-\\x7f]+"
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

DDL = Path(__file__).resolve().parents[2] / "ddl.sql"
BEGIN = "-- BEGIN codes (written by `python3 tasks/ingestion/codes.py --write-ddl` from its ALIASES; do not edit)"
END = "-- END codes"


def code(text: str, column: str = "") -> str:
    """A categorical value as its code ('' for a blank): the rule, then the column's alias, if any."""
    folded = unicodedata.normalize("NFC", re.sub(MARKS, "", unicodedata.normalize("NFKD", text)))
    coded = re.sub(SEPARATORS, "_", folded).strip("_").translate(ASCII_LOWER)
    return ALIASES.get(column, {}).get(coded, coded)


def ddl_block() -> str:
    """The part of ddl.sql generated from this module: the aliases, catalog_code() (the rule in SQL) and the
    recoding of the stored values of CODED_COLUMNS."""
    pairs = [(column, value, target) for column, table in sorted(ALIASES.items())
             for value, target in sorted(table.items())]
    rows = ",\n    ".join(f"('{column}', '{value}', '{target}')" for column, value, target in pairs)
    keys = ",\n    ".join(f"('{column}', '{value}')" for column, value, _ in pairs)
    recoded = ",\n    ".join(f"{column} = catalog_code('{column}', {column})" for column in CODED_COLUMNS)
    stored = ", ".join(CODED_COLUMNS)
    coded = ",\n                        ".join(f"catalog_code('{column}', {column})" for column in CODED_COLUMNS)
    return f"""{BEGIN}
INSERT INTO code_alias (column_name, value, code) VALUES
    {rows}
ON CONFLICT (column_name, value) DO UPDATE SET code = excluded.code;
DELETE FROM code_alias WHERE (column_name, value) NOT IN (VALUES
    {keys});

CREATE OR REPLACE FUNCTION catalog_code(p_column text, p_value text) RETURNS text
LANGUAGE sql STABLE AS $code$
    SELECT coalesce(a.code, nullif(r.code, ''))
    FROM (SELECT translate(btrim(regexp_replace(
                               normalize(regexp_replace(normalize(p_value, NFKD), '{MARKS}', '', 'g'), NFC),
                               '{SEPARATORS}', '_', 'g'), '_'),
                           '{string.ascii_uppercase}', '{string.ascii_lowercase}') AS code) r
    LEFT JOIN code_alias a ON a.column_name = p_column AND a.value = r.code
$code$;

-- Stored values that are not codes yet are recoded, on reaching version 5
-- (a warehouse upgraded from version 2 by version 3 or 4 kept 'rockfall' and
-- 'mud_debris_flow_x_') and whenever the aliases change; the replaced
-- versions in landslide_event_history keep theirs.
UPDATE landslide_event
SET {recoded}
WHERE ({stored})
      IS DISTINCT FROM ({coded})
  AND (NOT EXISTS (SELECT 1 FROM schema_version WHERE version = 5)
       OR EXISTS ((TABLE code_alias EXCEPT TABLE previous_code_alias)
                  UNION ALL (TABLE previous_code_alias EXCEPT TABLE code_alias)));
{END}"""


def write_ddl() -> None:
    text = DDL.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DDL.write_text(text[:start] + ddl_block() + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-ddl", action="store_true",
                        help=f"rewrite the codes block of {DDL} (without: print it)")
    args = parser.parse_args()
    if not args.write_ddl:
        print(ddl_block())
        return 0
    write_ddl()
    return 0


if __name__ == "__main__":
    sys.exit(main())
