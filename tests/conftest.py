"""Fixtures shared by every suite live in modules; this file only registers them."""

pytest_plugins = ["tests.etcd_fixtures", "tests.log_secrets"]
