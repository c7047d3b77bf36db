"""Retries: the policy as pure functions, then both clients against a real grpc.aio server scripted to fail.

Waits are recorded by an injected sleep, never measured: the assertions hold on any machine speed.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from openemploi.client import AsyncClient, Client, InvalidArgument, ResourceExhausted, RetryPolicy, Unavailable
from openemploi.client.retry import RETRYABLE

from .scripted import DIM, ScriptedServer, bad_text, overloaded, unavailable

POLICY = RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.2)

# -- the policy ----------------------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap():
    assert [POLICY.backoff(n, None, rand=0.0) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_jitter_stretches_a_wait_by_at_most_its_share():
    assert POLICY.backoff(2, None, rand=0.5) == pytest.approx(0.2 * 1.1)
    assert POLICY.backoff(2, None, rand=0.999) < 0.2 * 1.2


def test_the_servers_delay_replaces_the_backoff():
    assert POLICY.backoff(1, 2.5, rand=0.0) == 2.5  # longer than the backoff: never retry before the server said
    assert POLICY.backoff(3, 0.05, rand=0.0) == 0.05


@given(
    failures=st.integers(1, 50),
    server_delay=st.one_of(st.none(), st.floats(0.001, 3600)),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_a_wait_is_never_shorter_than_the_server_asked_nor_unbounded(failures, server_delay, rand):
    delay = POLICY.backoff(failures, server_delay, rand)
    assert delay >= (server_delay or POLICY.initial_backoff_s)
    assert delay <= max(server_delay or 0.0, POLICY.max_backoff_s) * (1 + POLICY.jitter)


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c not in RETRYABLE])
def test_only_unavailable_and_resource_exhausted_are_retried(code):
    assert POLICY.next_delay(code, 1, None, None, 0.0) is None


@pytest.mark.parametrize("code", sorted(RETRYABLE, key=str))
def test_retryable_codes_wait_until_the_attempts_are_spent(code):
    assert [POLICY.next_delay(code, n, None, None, 0.0) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, None])


def test_no_retry_when_the_wait_would_outlast_the_deadline():
    assert POLICY.next_delay(grpc.StatusCode.UNAVAILABLE, 1, 2.0, remaining_s=1.9, rand=0.0) is None
    assert POLICY.next_delay(grpc.StatusCode.UNAVAILABLE, 1, 2.0, remaining_s=2.1, rand=0.0) == 2.0


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_attempts=0),
        dict(initial_backoff_s=-1),
        dict(initial_backoff_s=2, max_backoff_s=1),
        dict(multiplier=0.5),
        dict(jitter=2),
    ],
)
def test_a_policy_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


# -- the clients against a scripted server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    running = ScriptedServer()
    yield running
    running.stop()


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(server, sleeps):
    with Client(server.address, retry=POLICY, sleep=sleeps.append, rand=lambda: 0.0) as client:  # the default deadline: 30 s
        yield client


def test_unavailable_is_retried_with_backoff_until_the_server_answers(server, client, sleeps):
    script = server.fail_with(unavailable(), unavailable())
    vectors = client.embed(["Boulanger", "Cariste"])
    assert vectors.shape == (2, DIM) and vectors.dtype == np.float32
    assert len(script.received) == 3
    assert sleeps == pytest.approx([0.1, 0.2])
    assert len({r.metadata["x-request-id"] for r in script.received}) == 1  # one call, one id in the server's logs


def test_resource_exhausted_waits_the_delay_the_server_sent(server, client, sleeps):
    script = server.fail_with(overloaded(2.5), overloaded(0.25))
    client.embed("Boulanger")
    assert len(script.received) == 3
    assert sleeps == pytest.approx([2.5, 0.25])


def test_retries_stop_after_max_attempts_with_the_last_error(server, client, sleeps):
    script = server.fail_with(*[unavailable()] * 10)
    with pytest.raises(Unavailable, match="draining"):
        client.embed("Boulanger")
    assert len(script.received) == POLICY.max_attempts
    assert len(sleeps) == POLICY.max_attempts - 1


def test_no_retry_when_the_servers_delay_outlasts_the_deadline(server, sleeps):
    script = server.fail_with(overloaded(60.0))
    with (
        Client(server.address, retry=POLICY, timeout=10, sleep=sleeps.append) as client,
        pytest.raises(ResourceExhausted) as info,
    ):
        client.embed("Boulanger")
    assert info.value.retry_delay == 60.0
    assert len(script.received) == 1 and sleeps == []


def test_every_try_carries_a_deadline_by_default(server, client):
    script = server.fail_with(unavailable())
    client.embed("Boulanger")
    assert all(r.timeout_s is not None and 0 < r.timeout_s < 31 for r in script.received)  # 30 s, give or take the clocks


def test_invalid_argument_is_not_retried(server, client, sleeps):
    script = server.fail_with(bad_text(0))
    with pytest.raises(InvalidArgument):
        client.embed("x" * 10)
    assert len(script.received) == 1 and sleeps == []


def test_create_collection_is_not_retried(server, client, sleeps):
    script = server.fail_with(unavailable())
    with pytest.raises(Unavailable):
        client.create_collection("offres")
    assert len(script.received) == 1 and sleeps == []


def test_the_async_client_retries_the_same_way(server):
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    async def main() -> np.ndarray:
        async with AsyncClient(server.address, retry=POLICY, sleep=sleep, rand=lambda: 0.0) as client:
            return await client.embed(["Boulanger"])

    script = server.fail_with(unavailable(), overloaded(1.5))
    assert asyncio.run(main()).shape == (1, DIM)
    assert len(script.received) == 3 and sleeps == pytest.approx([0.1, 1.5])
