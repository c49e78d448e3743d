"""Fixtures of the eval-script tests: the tiny random Whisper of the data-tool tests."""

from data_tools.conftest import tiny_whisper  # noqa: F401  (a fixture, registered by being imported)
