"""Typed outputs and inputs: schema generation, the API's rules, typed decoding. No I/O."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypedDict

import jsonschema
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallel_async._errors import InvalidArgumentError, ParallelError
from parallel_async._models import (
    AutoSchema,
    Citation,
    FieldBasis,
    JsonSchema,
    TaskRun,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskRunTextOutput,
    TaskSpec,
    TextSchema,
)
from parallel_async._schema import (
    MAX_DEPTH,
    MAX_ENUM_VALUES,
    MAX_PROPERTIES,
    MAX_TASK_SPEC_CHARS,
    SchemaError,
    input_schema_for,
    json_schema_for,
    output_schema_for,
    output_task_spec,
    output_type_of,
)
from parallel_async._typed import OutputValidationError, ParsedTaskRunResult, parse_output

# --- types under test (module level, so that msgspec resolves their annotations) ---------------


class Flat(msgspec.Struct):
    name: str
    employees: int
    revenue: float
    public: bool


class Address(msgspec.Struct):
    """A postal address.

    Attributes:
        zip: Postal code.
        city (str): The city, spelled
            as locals do.
    """

    zip: str
    city: str


class Sector(enum.Enum):
    """An industry sector."""

    TECH = "tech"
    ENERGY = "energy"


class Person(msgspec.Struct):
    name: str
    title: str | None = None


class Company(msgspec.Struct):
    """A company.

    Attributes:
        name: Ignored: the field's Meta description wins.
        address: Headquarters.
        offices: Other offices.
    """

    name: Annotated[str, msgspec.Meta(description="The legal name.")]
    address: Address
    offices: list[Address]
    people: list[Person]
    sector: Sector
    size: Literal["small", "large"]
    parent: Address | None = None
    stage: Literal["seed", "growth", None] = None
    founded: datetime.date | None = None


class Constrained(msgspec.Struct):
    age: Annotated[int, msgspec.Meta(ge=0, le=150, description="Age in years.")]
    code: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$", max_length=3)]
    tags: Annotated[list[str], msgspec.Meta(max_length=3)]
    seen: set[int]


class Base(msgspec.Struct):
    """Base.

    Attributes:
        ident: From the base class.
    """

    ident: str


class Child(Base):
    """Child.

    Fields:
        extra: From the subclass.
    """

    extra: int


class Renamed(msgspec.Struct, rename="camel"):
    """Renamed fields.

    Attributes:
        first_name: Given name.
    """

    first_name: str


class Tagged1(msgspec.Struct, tag=True):
    a: int


class Tagged2(msgspec.Struct, tag=True):
    b: str


class HasUnion(msgspec.Struct):
    item: Tagged1 | Tagged2


@dataclasses.dataclass
class Point:
    """A point.

    Attributes:
        x: Abscissa.
    """

    x: float
    y: float = 0.0


class Movie(TypedDict):
    title: str
    year: int


class Node(msgspec.Struct):
    name: str
    children: list[Node]


class Ping(msgspec.Struct):
    pong: Pong | None


class Pong(msgspec.Struct):
    ping: Ping


class L6(msgspec.Struct):
    x: int


class L5(msgspec.Struct):
    n: L6


class L4(msgspec.Struct):
    n: L5


class L3(msgspec.Struct):
    n: L4


class L2(msgspec.Struct):
    n: L3


class L1(msgspec.Struct):
    n: L2


class WithDict(msgspec.Struct):
    scores: dict[str, int]


class WithTuple(msgspec.Struct):
    pair: tuple[int, str]


class WithAny(msgspec.Struct):
    blob: Any


class WithNone(msgspec.Struct):
    nothing: None


class Empty(msgspec.Struct):
    pass


class WithEmpty(msgspec.Struct):
    inner: Empty


class WithExtraKeyword(msgspec.Struct):
    odd: Annotated[int, msgspec.Meta(extra_json_schema={"if": {"type": "integer"}})]


class Timed(msgspec.Struct):
    """Times of every kind: msgspec states a format for some, the rest get one from us."""

    at: datetime.datetime
    maybe_at: datetime.datetime | None
    alarms: list[datetime.time]
    local: Annotated[datetime.datetime, msgspec.Meta(tz=False, description="Wall clock.")]
    aware: Annotated[datetime.datetime, msgspec.Meta(tz=True)]
    opens: Annotated[datetime.time, msgspec.Meta(tz=False)]
    days: list[datetime.date | None] | None
    ident: uuid.UUID
    count_or_at: int | datetime.datetime | None


class Untagged1(msgspec.Struct):
    a: int


class Untagged2(msgspec.Struct):
    b: int


class UntaggedInner(msgspec.Struct):
    x: Untagged1 | Untagged2


class UntaggedOuter(msgspec.Struct):
    inner: UntaggedInner


class TwoStrLike(msgspec.Struct):
    when: int | datetime.datetime | str


class ListOfTwoStrLike(msgspec.Struct):
    z: list[TwoStrLike]


class RecursiveThenRefused(msgspec.Struct):
    kids: list[RecursiveThenRefused]
    bad: Untagged1 | Untagged2


@dataclasses.dataclass
class DataclassRefused:
    ok: int
    bad: dict[str, Untagged1 | Untagged2]


class TypedDictRefused(TypedDict):
    x: DataclassRefused | None


class RenamedRefused(msgspec.Struct, rename="camel"):
    some_field: Untagged1 | Untagged2


def _described(name: str, *lengths: int) -> Any:
    """A Struct whose fields ``f0``, ``f1``... have descriptions of ``lengths`` characters."""
    fields = [
        (f"f{i}", Annotated[str, msgspec.Meta(description="d" * n)]) for i, n in enumerate(lengths)
    ]
    return msgspec.defstruct(name, fields)


def _wide(n: int) -> Any:
    return msgspec.defstruct(f"Wide{n}", [(f"f{i}", int) for i in range(n)])


def _enum(name: str, n: int) -> Any:
    make: Any = enum.Enum  # built at run time: mypy can't follow the functional API here
    return make(name, {f"v{i}": i for i in range(n)})


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def _objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in _walk(schema) if isinstance(n, dict) and n.get("type") == "object"]


def _schema(tp: Any) -> dict[str, Any]:
    return json_schema_for(tp).json_schema


def _check(schema: dict[str, Any], sample: Any) -> None:
    """``schema`` is valid JSON Schema 2020-12 and ``sample`` conforms to it."""
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(sample)


def _result(content: dict[str, Any], basis: list[FieldBasis] | None = None) -> TaskRunResult:
    run = TaskRun(run_id="trun_1", status="completed", is_active=False, processor="base")
    return TaskRunResult(run=run, output=TaskRunJsonOutput(content=content, basis=basis or []))


ADDRESS = Address(zip="94105", city="San Francisco")
COMPANY = Company(
    name="Acme",
    address=ADDRESS,
    offices=[ADDRESS],
    people=[Person(name="Ada")],
    sector=Sector.TECH,
    size="small",
    founded=datetime.date(2020, 1, 2),
)


# --- schema generation --------------------------------------------------------------------------


def test_flat_struct() -> None:
    assert _schema(Flat) == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "employees": {"type": "integer"},
            "revenue": {"type": "number"},
            "public": {"type": "boolean"},
        },
        "required": ["name", "employees", "revenue", "public"],
        "additionalProperties": False,
    }
    _check(_schema(Flat), msgspec.to_builtins(Flat("a", 1, 2.5, True)))


def test_nested_structs_are_inlined_and_every_object_is_closed() -> None:
    schema = _schema(Company)
    nodes = list(_walk(schema))
    assert not any(isinstance(n, dict) and ("$ref" in n or "$defs" in n) for n in nodes)
    for obj in _objects(schema):
        assert obj["required"] == list(obj["properties"])
        assert obj["additionalProperties"] is False
    address = schema["properties"]["address"]
    assert address["properties"]["zip"] == {"type": "string", "description": "Postal code."}
    _check(schema, msgspec.to_builtins(COMPANY))


def test_optional_fields_are_nullable_and_still_required() -> None:
    schema = _schema(Company)
    parent = schema["properties"]["parent"]
    assert parent["anyOf"][1] == {"type": "null"}
    assert parent["anyOf"][0]["properties"].keys() == {"zip", "city"}
    assert "default" not in parent
    assert {"parent", "stage", "founded"} <= set(schema["required"])
    person = schema["properties"]["people"]["items"]
    assert person["properties"]["title"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    # a nullable Literal becomes an enum or null, not an enum holding null
    assert schema["properties"]["stage"] == {
        "anyOf": [{"enum": ["growth", "seed"], "type": "string"}, {"type": "null"}]
    }


def test_lists_of_structs() -> None:
    offices = _schema(Company)["properties"]["offices"]
    assert offices["type"] == "array"
    assert offices["description"] == "Other offices."
    assert offices["items"]["type"] == "object"
    assert offices["items"]["additionalProperties"] is False


def test_literal_and_enum_fields() -> None:
    props = _schema(Company)["properties"]
    assert props["size"] == {"enum": ["large", "small"], "type": "string"}
    assert props["sector"] == {
        "description": "An industry sector.",
        "enum": ["energy", "tech"],
        "type": "string",
    }


def test_tagged_unions_inline_without_discriminator() -> None:
    schema = _schema(HasUnion)
    item = schema["properties"]["item"]
    assert "discriminator" not in item
    assert [b["properties"]["type"]["enum"] for b in item["anyOf"]] == [["Tagged1"], ["Tagged2"]]
    _check(schema, {"item": {"type": "Tagged2", "b": "x"}})


def test_dataclass_and_typeddict() -> None:
    point = _schema(Point)
    assert point["required"] == ["x", "y"]
    assert point["properties"]["x"] == {"type": "number", "description": "Abscissa."}
    assert point["description"] == "A point."
    _check(point, {"x": 1.0, "y": 2.0})
    movie = _schema(Movie)
    assert movie["properties"] == {"title": {"type": "string"}, "year": {"type": "integer"}}
    assert movie["additionalProperties"] is False
    _check(movie, {"title": "Heat", "year": 1995})


def test_descriptions_from_meta_and_docstrings() -> None:
    schema = _schema(Company)
    assert schema["description"] == "A company."  # the summary, not the Attributes section
    props = schema["properties"]
    assert props["name"]["description"] == "The legal name."  # Meta wins over the docstring
    assert props["address"]["description"] == "Headquarters."  # field doc over class doc
    assert props["parent"]["anyOf"][0]["description"] == "A postal address."
    city = props["address"]["properties"]["city"]
    assert city["description"] == "The city, spelled as locals do."  # continuation joined
    child = _schema(Child)["properties"]
    assert child["ident"]["description"] == "From the base class."  # inherited along the MRO
    assert child["extra"]["description"] == "From the subclass."
    renamed = _schema(Renamed)["properties"]
    assert renamed == {"firstName": {"type": "string", "description": "Given name."}}


def test_validation_keywords_are_stripped_and_hinted_but_still_enforced() -> None:
    schema = _schema(Constrained)
    forbidden = {"minimum", "maximum", "pattern", "maxLength", "maxItems", "uniqueItems", "format"}
    assert not any(isinstance(n, dict) and forbidden & n.keys() for n in _walk(schema))
    props = schema["properties"]
    assert props["age"] == {
        "type": "integer",
        "description": "Age in years. [minimum: 0; maximum: 150]",
    }
    assert props["code"]["description"] == "[maxLength: 3; pattern: ^[A-Z]{3}$]"
    assert props["seen"]["description"] == "[uniqueItems: true]"
    _check(schema, {"age": 200, "code": "toolong", "tags": [], "seen": [1]})  # schema is lax
    with pytest.raises(OutputValidationError) as info:
        parse_output(_result({"age": 200, "code": "ABC", "tags": [], "seen": []}), Constrained)
    assert info.value.path == "$.age"
    founded = _schema(Company)["properties"]["founded"]["anyOf"][0]
    assert founded == {"type": "string", "description": "[format: date (YYYY-MM-DD)]"}


def test_dates_and_times_state_their_format() -> None:
    schema = _schema(Timed)
    assert not any(isinstance(n, dict) and "format" in n for n in _walk(schema))
    props = schema["properties"]
    rfc3339 = "[format: date-time (RFC 3339, e.g. 2024-01-31T09:30:00Z)]"
    # msgspec states no format for a datetime that may be naive: we add it
    assert props["at"] == {"type": "string", "description": rfc3339}
    assert props["maybe_at"]["anyOf"] == [
        {"type": "string", "description": rfc3339},
        {"type": "null"},
    ]
    assert props["alarms"]["items"]["description"] == "[format: time (RFC 3339, e.g. 09:30:00Z)]"
    assert props["local"]["description"] == (
        "Wall clock. [format: date-time without a UTC offset (e.g. 2024-01-31T09:30:00)]"
    )
    assert props["aware"]["description"] == rfc3339  # msgspec's own format, same words
    assert props["opens"]["description"] == "[format: time without a UTC offset (e.g. 09:30:00)]"
    day = props["days"]["anyOf"][0]["items"]["anyOf"][0]
    assert day == {"type": "string", "description": "[format: date (YYYY-MM-DD)]"}
    assert props["ident"]["description"].startswith("[format: uuid (e.g. ")
    assert props["count_or_at"]["anyOf"] == [
        {"type": "integer"},
        {"type": "string", "description": rfc3339},
        {"type": "null"},
    ]
    # input schemas stay as msgspec made them
    assert json_schema_for(Timed, what="input").json_schema["properties"]["at"] == {
        "type": "string"
    }


def test_dates_and_times_round_trip() -> None:
    content = {
        "at": "2024-01-31T09:30:00Z",
        "maybe_at": "2024-01-31T09:30:00.123456+02:00",
        "alarms": ["07:15:00", "07:30:00Z"],
        "local": "2024-01-31T09:30:00",
        "aware": "2024-01-31T09:30:00-05:00",
        "opens": "08:00:00",
        "days": ["2024-02-29", None],
        "ident": "123e4567-e89b-12d3-a456-426614174000",
        "count_or_at": "2024-01-31T09:30:00Z",
    }
    _check(_schema(Timed), content)
    parsed = parse_output(_result(content), Timed).output.parsed
    utc = datetime.timezone.utc
    assert parsed.at == datetime.datetime(2024, 1, 31, 9, 30, tzinfo=utc)
    assert parsed.maybe_at is not None
    assert parsed.maybe_at.utcoffset() == datetime.timedelta(hours=2)
    assert parsed.alarms == [datetime.time(7, 15), datetime.time(7, 30, tzinfo=utc)]
    assert parsed.local == datetime.datetime(2024, 1, 31, 9, 30)
    assert parsed.opens == datetime.time(8)
    assert parsed.days == [datetime.date(2024, 2, 29), None]
    assert parsed.ident == uuid.UUID("123e4567-e89b-12d3-a456-426614174000")
    assert parsed.count_or_at == datetime.datetime(2024, 1, 31, 9, 30, tzinfo=utc)
    assert msgspec.to_builtins(parsed) == {**content, "at": "2024-01-31T09:30:00Z"}
    # the constraints the schema could only state in words are enforced
    for field, bad in [("local", "2024-01-31T09:30:00Z"), ("aware", "2024-01-31T09:30:00")]:
        with pytest.raises(OutputValidationError) as info:
            parse_output(_result({**content, field: bad}), Timed)
        assert info.value.path == f"$.{field}"
    with pytest.raises(OutputValidationError) as info:
        parse_output(_result({**content, "at": "31/01/2024"}), Timed)
    assert info.value.field == "at"


def test_limits_at_the_edge_are_accepted() -> None:
    assert _objects(_schema(L2))[-1]["properties"] == {"x": {"type": "integer"}}  # depth 5
    assert len(_schema(_wide(MAX_PROPERTIES))["properties"]) == MAX_PROPERTIES
    big = _enum("Big", MAX_ENUM_VALUES)
    wide_enum = msgspec.defstruct("WideEnum", [("e", big)])
    assert len(_schema(wide_enum)["properties"]["e"]["enum"]) == MAX_ENUM_VALUES


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "path", "words"),
    [
        (Node, "Node.children[]", "Node contains itself"),
        (Ping, "Ping.pong.ping", "Ping contains itself"),
        (list[int], "list[int]", "not type 'array'"),
        (int, "int", "not type 'integer'"),
        (Address | None, repr(Address | None), "not a union"),
        (L1, "L1.n.n.n.n.n", f"nested 6 deep; the API allows {MAX_DEPTH}"),
        (WithDict, "WithDict.scores", "dicts with free-form keys"),
        (WithTuple, "WithTuple.pair", "tuples are not supported"),
        (WithAny, "WithAny.blob", "typing.Any"),
        (WithNone, "WithNone.nothing", "can only be null"),
        (WithEmpty, "WithEmpty.inner", "objects without named fields"),
        (WithExtraKeyword, "WithExtraKeyword.odd", "keyword 'if' is not supported"),
        (object, "object", "no JSON schema for this type"),
        # msgspec refuses these; its reason is kept, the field is found
        (UntaggedOuter, "UntaggedOuter.inner.x", "Struct types must be tagged"),
        (ListOfTwoStrLike, "ListOfTwoStrLike.z[].when", "more than one str-like type"),
        (RecursiveThenRefused, "RecursiveThenRefused.bad", "Struct types must be tagged"),
        (DataclassRefused, "DataclassRefused.bad.*", "Struct types must be tagged"),
        (TypedDictRefused, "TypedDictRefused.x.bad.*", "Struct types must be tagged"),
        (RenamedRefused, "RenamedRefused.someField", "Struct types must be tagged"),
        (list[UntaggedInner], f"{list[UntaggedInner]!r}[].x", "must be tagged"),
        (Untagged1 | Untagged2, repr(Untagged1 | Untagged2), "must be tagged"),
    ],
)
def test_refusals_name_the_field(tp: Any, path: str, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        json_schema_for(tp)
    assert info.value.path.startswith(path)
    assert str(info.value).startswith(f"{path}")
    assert words in str(info.value)
    assert isinstance(info.value, InvalidArgumentError)
    assert isinstance(info.value, ValueError)


def test_too_many_properties_in_all() -> None:
    with pytest.raises(SchemaError, match=f"more than {MAX_PROPERTIES} properties"):
        json_schema_for(_wide(MAX_PROPERTIES + 1))
    half = _wide(60)
    both = msgspec.defstruct("Both", [("a", half), ("b", half)])
    with pytest.raises(SchemaError, match=r"^Both\.b: more than 100 properties"):
        json_schema_for(both)


def test_msgspec_refusals_name_the_field_in_input_schemas_too() -> None:
    with pytest.raises(SchemaError) as info:
        json_schema_for(UntaggedOuter, what="input")
    assert info.value.path == "UntaggedOuter.inner.x"
    assert str(info.value).startswith("UntaggedOuter.inner.x: no JSON schema for this type (")
    assert "Struct types must be tagged" in str(info.value)  # msgspec's reason


def test_too_many_enum_values() -> None:
    big = _enum("Bigger", MAX_ENUM_VALUES + 1)
    with pytest.raises(SchemaError, match=r"^Huge\.e: more than 500 enum values"):
        json_schema_for(msgspec.defstruct("Huge", [("e", big)]))


# --- size -----------------------------------------------------------------------------------------


def _size(spec: Any) -> int:
    return len(msgspec.json.encode(spec).decode())


def test_a_schema_at_the_size_limit_is_accepted_one_more_character_is_not() -> None:
    probe = _size(json_schema_for(_described("Probe", 0)))
    fits = MAX_TASK_SPEC_CHARS - probe
    assert _size(json_schema_for(_described("AtLimit", fits))) == MAX_TASK_SPEC_CHARS
    with pytest.raises(SchemaError) as info:
        json_schema_for(_described("OverLimit", fits + 1))
    assert info.value.path == "OverLimit.f0"
    assert str(info.value) == (
        f"OverLimit.f0: the output schema is {MAX_TASK_SPEC_CHARS + 1:,} characters of JSON, "
        f"over the {MAX_TASK_SPEC_CHARS:,} the API allows for a task spec (its input and output "
        f"schemas together); this field has the longest description ({fits + 1:,} characters): "
        "shorten it or the other descriptions"
    )
    assert isinstance(info.value, InvalidArgumentError)


def test_an_oversized_schema_names_the_longest_description() -> None:
    inner = _described("Notes", 100, 9_000)
    outer = msgspec.defstruct(
        "Report",
        [("summary", Annotated[str, msgspec.Meta(description="s" * 7_000)]), ("notes", inner)],
    )
    with pytest.raises(SchemaError, match=r"^Report\.notes\.f1: the output schema is "):
        json_schema_for(outer)
    with pytest.raises(SchemaError, match=r"^Report\.notes\.f1: the input schema is "):
        json_schema_for(outer, what="input")
    items: Any = list.__class_getitem__(_described("Item", 16_000))
    in_list = msgspec.defstruct("InList", [("items", items)])
    with pytest.raises(SchemaError, match=r"^InList\.items\[\]\.f0: "):
        json_schema_for(in_list)


def test_an_oversized_schema_without_descriptions_names_the_root() -> None:
    values: Any = Literal.__getitem__(tuple("v" * 150 + str(i) for i in range(100)))
    big = msgspec.defstruct("LongEnum", [("e", values)])
    with pytest.raises(SchemaError, match=r"^LongEnum: the output schema is .* fewer enum values"):
        json_schema_for(big)


def test_task_spec_size_counts_input_and_output_together() -> None:
    out, inp = _described("OutSpec", 6_000, 1_000), _described("InSpec", 8_000)
    with pytest.raises(SchemaError) as info:
        output_task_spec(out, input_schema=inp)
    assert info.value.path == "InSpec.f0"
    assert "the task spec is " in str(info.value)
    # a ready part is measured too, and may hold the longest description
    text = "t" * 9_000
    with pytest.raises(SchemaError, match=r"^input_schema: the task spec is "):
        output_task_spec(out, input_schema=text)
    ready = {"type": "object", "properties": {"a": {"type": "string", "description": text}}}
    with pytest.raises(SchemaError, match=r"^output_schema\.a: the task spec is "):
        output_task_spec(ready, input_schema=inp)
    spec = TaskSpec(output_schema=JsonSchema(json_schema=ready))
    with pytest.raises(SchemaError, match=r"^output_schema\.a: "):
        output_task_spec(spec, input_schema=inp)
    # without a part built from a type, the size is the API's to judge
    assert _size(output_task_spec(ready, input_schema=text)) > MAX_TASK_SPEC_CHARS
    small = output_task_spec(out, input_schema=_described("SmallIn", 10))
    assert _size(small) <= MAX_TASK_SPEC_CHARS


# --- input schemas ------------------------------------------------------------------------------


def test_input_schemas_are_less_strict() -> None:
    schema = json_schema_for(Constrained, what="input").json_schema
    assert schema["properties"]["age"]["minimum"] == 0  # kept: it describes the input
    assert "additionalProperties" not in schema
    assert json_schema_for(WithDict, what="input").json_schema["properties"]["scores"] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }
    jsonschema.Draft202012Validator.check_schema(json_schema_for(Company, what="input").json_schema)
    with pytest.raises(SchemaError, match="Node contains itself"):
        json_schema_for(Node, what="input")
    with pytest.raises(SchemaError, match="input schema must be one object type"):
        json_schema_for(list[str], what="input")


# --- caching and passthroughs -------------------------------------------------------------------


def test_schemas_are_built_once_per_type() -> None:
    assert json_schema_for(Company) is json_schema_for(Company)
    assert output_task_spec(Company).output_schema is json_schema_for(Company)
    assert json_schema_for(Company, what="input") is not json_schema_for(Company)


def test_passthroughs() -> None:
    ready = JsonSchema(json_schema={"type": "object", "properties": {}})
    assert output_schema_for(ready) is ready
    assert output_schema_for("A short report") == "A short report"
    bare = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert output_schema_for(bare) == JsonSchema(json_schema=bare)
    assert output_schema_for({"type": "json", "json_schema": bare}) == JsonSchema(json_schema=bare)
    assert output_schema_for({"type": "text", "description": "d"}) == TextSchema(description="d")
    assert output_schema_for({"type": "auto"}) == AutoSchema()
    spec = TaskSpec(output_schema="x")
    assert output_task_spec(spec) is spec
    with_input = output_task_spec(spec, input_schema=Movie)
    assert with_input.input_schema == json_schema_for(Movie, what="input")
    assert output_task_spec("x", input_schema="a company name") == TaskSpec(
        output_schema="x", input_schema="a company name"
    )
    assert input_schema_for(bare) == JsonSchema(json_schema=bare)
    with pytest.raises(InvalidArgumentError, match="auto"):
        input_schema_for({"type": "auto"})


def test_output_type_of() -> None:
    assert output_type_of(Company) is Company
    for schema in ("text", {"type": "auto"}, AutoSchema(), TaskSpec(output_schema="x"), None):
        assert output_type_of(schema) is None


# --- decoding -----------------------------------------------------------------------------------


def test_round_trip_and_basis() -> None:
    basis = [
        FieldBasis(field="name", reasoning="on the website", citations=[Citation(url="https://a")]),
        FieldBasis(field="offices.0", reasoning="filings", confidence="high"),
    ]
    result = _result(msgspec.to_builtins(COMPANY), basis)
    parsed: ParsedTaskRunResult[Company] = parse_output(result, Company)
    assert parsed.output.parsed == COMPANY
    assert parsed.output.type == "json"
    assert parsed.output.content is result.output.content
    assert parsed.result is result
    assert parsed.run.run_id == "trun_1"
    name_basis = parsed.output.basis_for("name")
    assert name_basis is not None
    assert name_basis.citations[0].url == "https://a"
    office = parsed.output.basis_for("offices.0")
    assert office is not None
    assert office.confidence == "high"
    assert parsed.output.basis_for("sector") is None
    assert parsed.output.basis == basis


def test_dataclass_and_typeddict_decode() -> None:
    assert parse_output(_result({"x": 1.5, "y": 2}), Point).output.parsed == Point(1.5, 2.0)
    movie = parse_output(_result({"title": "Heat", "year": 1995}), Movie).output.parsed
    assert movie == {"title": "Heat", "year": 1995}


def test_mismatch_keeps_content_path_and_result() -> None:
    content = msgspec.to_builtins(COMPANY)
    content["address"]["zip"] = 94105
    result = _result(content)
    with pytest.raises(OutputValidationError) as info:
        parse_output(result, Company)
    err = info.value
    assert isinstance(err, ParallelError)
    assert err.content is content
    assert err.path == "$.address.zip"
    assert err.field == "address.zip"
    assert err.result is result
    assert err.run_id == "trun_1"
    assert err.output_type is Company
    assert "Expected `str`, got `int`" in str(err)
    assert str(err).startswith("run trun_1: the output does not fit Company")


def test_missing_field_and_list_element_paths() -> None:
    content = msgspec.to_builtins(COMPANY)
    del content["address"]["city"]
    with pytest.raises(OutputValidationError) as info:
        parse_output(_result(content), Company)
    assert info.value.path == "$.address.city"
    content = msgspec.to_builtins(COMPANY)
    content["people"][0]["name"] = None
    with pytest.raises(OutputValidationError) as info:
        parse_output(_result(content), Company)
    assert info.value.field == "people[0].name"


def test_strict_and_lax_decoding() -> None:
    result = _result({"name": "a", "employees": 3.0, "revenue": 1, "public": True})
    with pytest.raises(OutputValidationError, match="employees"):
        parse_output(result, Flat)
    assert parse_output(result, Flat, strict=False).output.parsed.employees == 3


def test_text_output_with_a_typed_request() -> None:
    run = TaskRun(run_id="trun_2", status="completed", is_active=False, processor="base")
    result = TaskRunResult(run=run, output=TaskRunTextOutput(content="# Report"))
    with pytest.raises(OutputValidationError, match="the output is text, but Company") as info:
        parse_output(result, Company)
    assert info.value.content == "# Report"
    assert info.value.path == "$"
    assert info.value.field == ""
    assert info.value.result is result


# --- every schema is valid JSON Schema, and the content it describes decodes -------------------


_addresses = st.builds(Address, zip=st.text(max_size=5), city=st.text())
_times = st.builds(
    Timed,
    at=st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),
    maybe_at=st.none() | st.datetimes(timezones=st.just(datetime.timezone.utc)),
    alarms=st.lists(st.times(), max_size=2),
    local=st.datetimes(),
    aware=st.datetimes(timezones=st.just(datetime.timezone(datetime.timedelta(hours=-5)))),
    opens=st.times(),
    days=st.none() | st.lists(st.none() | st.dates(), max_size=2),
    ident=st.uuids(),
    count_or_at=st.none() | st.integers() | st.datetimes(),
)


@given(timed=_times)
def test_dates_and_times_in_content_decode(timed: Timed) -> None:
    content = msgspec.to_builtins(timed)
    _check(_schema(Timed), content)
    assert parse_output(_result(content), Timed).output.parsed == timed


_companies = st.builds(
    Company,
    name=st.text(),
    address=_addresses,
    offices=st.lists(_addresses, max_size=3),
    people=st.lists(st.builds(Person, name=st.text(), title=st.none() | st.text()), max_size=2),
    sector=st.sampled_from(Sector),
    size=st.sampled_from(["small", "large"]),
    parent=st.none() | _addresses,
    stage=st.sampled_from(["seed", "growth", None]),
    founded=st.none() | st.dates(),
)


@given(company=_companies)
def test_conforming_content_validates_and_round_trips(company: Company) -> None:
    content = msgspec.to_builtins(company)
    _check(_schema(Company), content)
    assert parse_output(_result(content), Company).output.parsed == company


@pytest.mark.parametrize(
    "tp", [Flat, Address, Company, Constrained, Child, Renamed, HasUnion, Point, Movie, L2, Timed]
)
def test_every_generated_schema_is_valid_json_schema(tp: Any) -> None:
    for what in ("output", "input"):
        schema = json_schema_for(tp, what=what).json_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        # closed objects: an unknown key is rejected in outputs
        validator = jsonschema.Draft202012Validator(schema)
        if what == "output":
            assert not validator.is_valid({"unexpected": 1})
