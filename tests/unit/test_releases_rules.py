from __future__ import annotations

import datetime as dt

import pytest

from ember.core.errors import ValidationFailed
from ember.core.events import NewEvent, RecordedEvent
from ember.core.releases import (
    Contents,
    ReleaseCreated,
    ReleaseNotFound,
    ReleasePromoted,
    check_image,
    decide_deploy,
    decide_rollback,
    fold_releases,
)

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def record(events: list[object]) -> list[RecordedEvent]:
    out = []
    for i, e in enumerate(events, start=1):
        new = NewEvent.of(e)  # type: ignore[arg-type]
        out.append(
            RecordedEvent(
                i,
                1,
                "releases-a.prod",
                i,
                new.type,
                1,
                dict(new.data),
                {},
                dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            )
        )
    return out


def deploy(history: list[object], digest: str, manifest_hash: str = "sha256:m") -> list[object]:
    state = fold_releases(record(history))
    return list(
        decide_deploy(
            state,
            app_id="a",
            env="prod",
            contents=Contents("local/hello", digest, manifest_hash, 0),
            manifest={"app": "hello"},
            author="ada@example.com",
        )
    )


def test_first_deploy_creates_v1_and_promotes_it() -> None:
    events = deploy([], D1)
    assert [type(e) for e in events] == [ReleaseCreated, ReleasePromoted]
    assert events[0].version == 1 and events[1].version == 1  # type: ignore[attr-defined]
    assert events[0].reason == "deploy"  # type: ignore[attr-defined]


def test_deploying_the_live_release_again_creates_nothing() -> None:
    history = deploy([], D1)
    assert deploy(history, D1) == []
    # A different manifest or image is a new release.
    assert deploy(history, D1, "sha256:other")[0].version == 2  # type: ignore[attr-defined]
    assert deploy(history, D2)[0].version == 2  # type: ignore[attr-defined]


def test_rollback_defaults_to_the_release_before_the_live_one() -> None:
    history = deploy([], D1)
    history += deploy(history, D2)
    state = fold_releases(record(history))
    assert state.active == 2
    events = decide_rollback(state, target=None, author="bob@example.com")
    created = events[0]
    assert isinstance(created, ReleaseCreated)
    assert (created.version, created.image_digest, created.reason, created.rollback_of) == (
        3,
        D1,
        "rollback",
        1,
    )
    assert created.author == "bob@example.com"
    # Rolling back to what is live changes nothing.
    history += events
    assert decide_rollback(fold_releases(record(history)), target=1, author="x") == []


def test_rollback_errors_are_not_found() -> None:
    with pytest.raises(ReleaseNotFound, match="no release is live"):
        decide_rollback(fold_releases([]), target=None, author="x")
    state = fold_releases(record(deploy([], D1)))
    with pytest.raises(ReleaseNotFound, match="first release"):
        decide_rollback(state, target=None, author="x")
    with pytest.raises(ReleaseNotFound, match="v9"):
        decide_rollback(state, target=9, author="x")


@pytest.mark.parametrize(
    ("repository", "digest"),
    [
        ("Local/Hello", D1),
        ("local/hello", "sha256:abc"),
        ("", D1),
        ("a//b", D1),
        ("local/hello", "md5:" + "1" * 64),
    ],
)
def test_bad_image_references_are_refused(repository: str, digest: str) -> None:
    with pytest.raises(ValidationFailed):
        check_image(repository, digest)
