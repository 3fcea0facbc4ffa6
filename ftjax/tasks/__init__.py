"""Bundled tasks: small, generated datasets used by the demo and the tests."""
