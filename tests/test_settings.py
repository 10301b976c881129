"""settings: every environment variable in one place, following the environment, -v without writing it."""

import os

import pytest

from infdit_cli.settings import NAMES, Settings, clear_overrides, override, settings


def test_reads_the_environment_and_follows_a_change(monkeypatch, tmp_path):
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path))
    monkeypatch.setenv("INFDIT_OFFLINE", " Yes ")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    s = settings()
    assert (s.cache, s.offline, s.hub_offline) == (str(tmp_path), True, False)
    assert settings() is s  # read once while nothing changed
    monkeypatch.setenv("INFDIT_CACHE", "")
    assert settings().cache is None  # empty is unset


def test_override_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("INFDIT_DEBUG", raising=False)
    try:
        override(debug=True)
        assert settings().debug and "INFDIT_DEBUG" not in os.environ
        with pytest.raises(TypeError, match="no such setting: nope"):
            override(nope=1)
    finally:
        clear_overrides()
    assert not settings().debug


def test_torchrun_variables_keep_an_empty_value():
    s = Settings.read({"RANK": "", "WORLD_SIZE": ""})
    assert (s.rank, s.world_size, s.local_rank) == ("", "", None)


def test_every_variable_read_is_named():
    class Spy(dict):
        seen: set = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            self.seen.add(key)
            return super().__contains__(key)

    Settings.read(Spy())
    assert Spy.seen == set(NAMES)
