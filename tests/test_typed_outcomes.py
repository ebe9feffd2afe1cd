"""Outcomes are typed: ``if o.ok`` narrows, ``output=T`` types ``o.parsed``; input order and the
task group on the outcomes; metadata per input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from parallel_async import AsyncParallel, Completed, Failed, InvalidArgumentError
from parallel_async.testing import FakeParallel, FakeServer, RunPlan

TYPED_EXAMPLE = textwrap.dedent(
    """
    import anyio
    import msgspec
    from parallel_async import AsyncParallel


    class Company(msgspec.Struct):
        founded: int


    async def main() -> None:
        async with AsyncParallel() as client:
            async with client.map(["a"], processor="base", output=Company) as outcomes:
                async for o in outcomes:
                    if o.ok:
                        reveal_type(o.result.output)
                        reveal_type(o.parsed.output.parsed)
                        year: int = o.parsed.output.parsed.founded
                    else:
                        reveal_type(o.error)
            async with client.map(["a"], processor="base") as plain:
                async for p in plain:
                    if p.ok:
                        reveal_type(p.parsed)
                        print(p.result.output.content)
                    if p.error is None:
                        reveal_type(p.result)


    anyio.run(main)
    """
)


def test_a_typed_map_type_checks_and_narrows(tmp_path: Path) -> None:
    from mypy import api

    example = tmp_path / "example.py"
    example.write_text(TYPED_EXAMPLE)
    out, err, _ = api.run(
        ["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / ".cache"), str(example)]
    )
    revealed = [
        line.split("Revealed type is ")[1] for line in out.splitlines() if "Revealed" in line
    ]
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not errors, out + err
    assert revealed == [
        '"parallel_async._models.TaskRunJsonOutput | parallel_async._models.TaskRunTextOutput"',
        '"example.Company"',
        '"parallel_async._errors.ParallelError"',
        '"None"',
        '"parallel_async._models.TaskRunResult"',
    ], out


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", ["group", "poll"])
async def test_input_order_waits_for_earlier_runs(
    fake_server: FakeServer, fake_parallel: FakeParallel, strategy: str
) -> None:
    # Later inputs finish first; with order="input" they still come out in input order.
    fake_parallel.plan = lambda body: RunPlan(duration=0.2 if body["input"] == "i0" else 0.0)
    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, max_in_flight=4, create_rate_limit=None
    ) as client:
        async with client.map(
            [f"i{n}" for n in range(8)],
            processor="lite",
            order="input",
            strategy="group" if strategy == "group" else "poll",
        ) as outcomes:
            got = [o async for o in outcomes]
            group_id = outcomes.group_id
    assert [o.index for o in got] == list(range(8))
    assert [o.input for o in got] == [f"i{n}" for n in range(8)]
    assert all(isinstance(o, Completed) for o in got)
    if strategy == "group":
        assert group_id is not None and group_id in fake_parallel.groups
        assert set(fake_parallel.groups[group_id].run_ids) == {o.run_id for o in got}
    else:
        assert group_id is None


@pytest.mark.anyio
async def test_metadata_per_input(fake_server: FakeServer, fake_parallel: FakeParallel) -> None:
    def meta(row: dict[str, str]) -> dict[str, str | int | float | bool]:
        if row["key"] == "bad":
            raise KeyError("no key")
        return {"row_key": row["key"]}

    rows = [{"key": "k1"}, {"key": "bad"}, {"key": "k3"}]
    async with AsyncParallel(
        api_key="test-key", base_url=fake_server.url, max_in_flight=4, create_rate_limit=None
    ) as client:
        async with client.map(rows, processor="lite", metadata=meta, order="input") as outcomes:
            got = [o async for o in outcomes]
    assert isinstance(got[1], Failed) and isinstance(got[1].error, InvalidArgumentError)
    assert "metadata function failed" in str(got[1].error)
    for o in (got[0], got[2]):
        assert o.ok and o.run_id is not None
        record = fake_parallel.runs[o.run_id]
        assert record.metadata is not None
        assert record.metadata["row_key"] == msgspec.convert(o.input, dict)["key"]
    assert len(fake_parallel.runs) == 2  # the bad row never became a run


@pytest.mark.anyio
async def test_order_is_checked_before_any_request() -> None:
    async with AsyncParallel(api_key="k", base_url="http://127.0.0.1:9") as client:
        with pytest.raises(InvalidArgumentError, match="order"):
            async with client.map(["a"], processor="lite", order="sorted"):  # type: ignore[call-overload]
                pass
