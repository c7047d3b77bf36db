"""The asyncio client has the blocking client's methods and gives the same answers."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

from openemploi.client import AsyncClient, Client, FieldViolation, InvalidArgument, RetryPolicy, TextKind

from .scripted import ScriptedServer, bad_text

PUBLIC = sorted(name for name, _ in inspect.getmembers(Client, inspect.isfunction) if not name.startswith("_"))


def test_the_async_client_has_every_method_of_the_blocking_one_with_the_same_parameters():
    for name in PUBLIC:
        method = getattr(AsyncClient, name, None)
        assert method is not None and inspect.iscoroutinefunction(method), name
        assert inspect.signature(method).parameters.keys() == inspect.signature(getattr(Client, name)).parameters.keys(), name
    assert inspect.signature(AsyncClient).parameters.keys() == inspect.signature(Client).parameters.keys()


def test_the_async_client_answers_as_the_blocking_one(live_server, client):
    texts = ["Boulanger / Boulangère", "cariste CACES R489"]

    async def main():
        async with AsyncClient(live_server.address) as aclient:
            vectors, matches, models = await asyncio.gather(
                aclient.embed(texts, kind=TextKind.PASSAGE),
                aclient.match_occupation("aide-soignante en EHPAD", k=3),
                aclient.list_models(),
            )
            return vectors, matches, models

    vectors, matches, models = asyncio.run(main())
    # Concurrent calls may share a batch (other padding): equal up to float rounding, not bit for bit.
    np.testing.assert_allclose(vectors, client.embed(texts, kind=TextKind.PASSAGE), atol=1e-5)
    expected = client.match_occupation("aide-soignante en EHPAD", k=3)
    assert [m.code for m in matches] == [m.code for m in expected]
    assert [m.score for m in matches] == pytest.approx([m.score for m in expected], abs=1e-4)
    assert models == client.list_models()


@pytest.fixture(scope="module")
def scripted():
    running = ScriptedServer()
    yield running
    running.stop()


def test_the_async_client_reads_the_error_details(scripted):
    async def main():
        async with AsyncClient(scripted.address, retry=RetryPolicy(max_attempts=1)) as aclient:
            await aclient.embed(["court", "trop long"])

    script = scripted.fail_with(bad_text(1))
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(main())
    assert info.value.field_violations == [FieldViolation("texts[1]", "over 512 tokens")]
    assert info.value.reason == "TEXT_TOO_LONG" and info.value.request_id == script.received[0].metadata["x-request-id"]
