"""Typed outputs and inputs: schema generation, the API's rules, typed decoding. No I/O."""

from __future__ import annotations

import dataclasses
import datetime
import enum
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
from parallel_async._typed import (
    MAX_DEPTH,
    MAX_ENUM_VALUES,
    MAX_PROPERTIES,
    OutputValidationError,
    ParsedTaskRunResult,
    SchemaError,
    input_schema_for,
    json_schema_for,
    output_schema_for,
    output_task_spec,
    output_type_of,
    parse_output,
)

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
    assert founded == {"type": "string", "description": "[format: date]"}


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


def test_too_many_enum_values() -> None:
    big = _enum("Bigger", MAX_ENUM_VALUES + 1)
    with pytest.raises(SchemaError, match=r"^Huge\.e: more than 500 enum values"):
        json_schema_for(msgspec.defstruct("Huge", [("e", big)]))


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
    "tp", [Flat, Address, Company, Constrained, Child, Renamed, HasUnion, Point, Movie, L2]
)
def test_every_generated_schema_is_valid_json_schema(tp: Any) -> None:
    for what in ("output", "input"):
        schema = json_schema_for(tp, what=what).json_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        # closed objects: an unknown key is rejected in outputs
        validator = jsonschema.Draft202012Validator(schema)
        if what == "output":
            assert not validator.is_valid({"unexpected": 1})
