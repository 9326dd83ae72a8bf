"""Test receivers, fixtures and synthetic streams shared by the tests and ``bench/``; never shipped."""
