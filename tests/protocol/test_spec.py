"""SPEC.md and the code say the same thing: message table, dtypes, codes, limits, exports."""

from __future__ import annotations

import re
from pathlib import Path

import protocol
from protocol import DEFAULT_LIMITS, ERROR_CODES, ROLES, SCHEMAS, WIRE_DTYPES, Kind
from protocol.messages import DONE_REASONS, JOB_STATES, NONFINITE_FLOATS, REPLY_FIELDS

SPEC = (Path(protocol.__file__).parent / "SPEC.md").read_text()


def section(title: str) -> str:
    start = SPEC.index(f"## {title}")
    end = SPEC.find("\n## ", start + 1)
    return SPEC[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|--")]
    return [[cell.strip() for cell in row] for row in rows[1:]]


def test_message_table_matches_the_schemas() -> None:
    rows = table_rows(section("5. Messages"))
    assert [row[0].strip("`") for row in rows] == list(SCHEMAS)
    for row in rows:
        spec = SCHEMAS[row[0].strip("`")]
        fields = ", ".join(f"{f.name}{'?' if f.optional else ''}: {f.kind.value}"
                           for f in spec.fields)
        assert (row[1], row[2]) == (spec.sender, fields), spec.type


def test_dtype_table_matches_the_codec() -> None:
    listed = {}
    for row in table_rows(section("3. Tensors")):
        for name, size in ((row[0], row[1]), (row[3], row[4])):
            if name:
                listed[name.strip("`")] = int(size)
    assert listed == {name: dt.itemsize for name, dt in WIRE_DTYPES.items()}


def test_allowed_values_are_all_spelled_out() -> None:
    for value in (*ERROR_CODES, *ROLES, *JOB_STATES, *DONE_REASONS):
        assert f"`{value}`" in SPEC, value


def test_limits_table_matches_the_defaults() -> None:
    units = {"MiB": 1 << 20, "GiB": 1 << 30}
    for name, default, _ in table_rows(section("8. Limits")):
        number, _, unit = default.partition(" ")
        value = 2 ** int(number[2:]) if number.startswith("2^") else int(number)
        assert getattr(DEFAULT_LIMITS, name.strip("`")) == value * units.get(unit, 1), name


def test_package_exports_its_public_api() -> None:
    public = {n for n in vars(protocol) if not n.startswith("_")
              and not re.fullmatch(r"codec|curve|dtypes|keys|limits|messages|transport|vectors", n)}
    assert set(protocol.__all__) == public


def bullet(title: str) -> str:
    """The text of the SPEC.md bullet that starts with ``- **title**``."""
    start = SPEC.index(f"- **{title}**")
    end = SPEC.find("\n- ", start + 1)
    return SPEC[start:end]


def test_float_fields_that_may_be_nonfinite_are_the_ones_the_code_allows() -> None:
    text = bullet("float")
    listed = set(re.findall(r"`(\w+\.\w+)`", text[text.index("except"):]))
    assert listed == NONFINITE_FLOATS
    floats = {p for s in SCHEMAS.values() for f, p in zip(s.fields, s.paths)
              if f.kind is Kind.FLOAT}
    assert floats > NONFINITE_FLOATS


def test_closed_value_sets_are_the_fields_with_choices() -> None:
    listed = set(re.findall(r"`(\w+\.\w+)`", bullet("Closed value sets").split("Every")[0]))
    assert listed == {p for s in SCHEMAS.values() for f, p in zip(s.fields, s.paths)
                      if f.choices}


def test_reply_forms_are_spelled_out() -> None:
    text = section("4. Who talks to whom")
    start = text.index("a reply carries all of them (") + len("a reply carries all of them (")
    listed = " ".join(text[start:text.index(")", start)].split())
    assert listed == "; ".join(f"`{type_}`: " + ", ".join(f"`{n}`" for n in names)
                               for type_, names in REPLY_FIELDS.items())
