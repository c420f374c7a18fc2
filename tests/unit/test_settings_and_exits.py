from __future__ import annotations

from pathlib import Path

import pytest

from ember.cli.exits import Exit, exit_code_for
from ember.core import errors
from ember.core.settings import load_settings
from ember.store.errors import DatabaseUnavailable, MigrationFailed


def test_settings_default_home_follows_xdg_then_home() -> None:
    assert load_settings({"HOME": "/h"}).home == Path("/h/.local/share/ember")
    assert load_settings({"HOME": "/h", "XDG_DATA_HOME": "/x"}).home == Path("/x/ember")


def test_settings_env_beats_default_and_flags_beat_env() -> None:
    env = {"HOME": "/h", "EMBER_HOME": "/e", "EMBER_DATABASE_URL": "dbname=x"}
    s = load_settings(env)
    assert (s.home, s.database_url) == (Path("/e"), "dbname=x")
    assert load_settings(env, home=Path("/flag")).home == Path("/flag")
    assert s.postgres_dir == Path("/e/postgres")


def test_empty_database_url_means_embedded() -> None:
    assert load_settings({"HOME": "/h", "EMBER_DATABASE_URL": ""}).database_url is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidEvent, Exit.USAGE),
        (errors.UnknownEventType, Exit.USAGE),
        (errors.IdempotencyKeyReused, Exit.USAGE),
        (errors.NotFound, Exit.NOT_FOUND),
        (errors.ConcurrencyConflict, Exit.CONFLICT),
        (DatabaseUnavailable, Exit.UNREACHABLE),
        (MigrationFailed, Exit.UNEXPECTED),
    ],
)
def test_error_kinds_map_to_documented_exit_codes(
    error: type[errors.EmberError], code: Exit
) -> None:
    assert exit_code_for(error("x")) == code


def test_exit_codes_are_stable() -> None:
    assert [int(e) for e in Exit] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_error_codes_are_unique() -> None:
    seen: dict[str, type] = {}
    stack: list[type] = [errors.EmberError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        assert seen.setdefault(cls.code, cls) is cls, f"{cls.code} used twice"
