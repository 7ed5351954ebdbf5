"""Load settings from the YAML file and the environment, failing with one clear line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from esplanade.config.settings import ENV_NESTED, ENV_PREFIX, Settings, unknown_env_settings


class ConfigError(Exception):
    """A bad configuration. The message is one line naming the setting."""


def load_settings(config_file: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if environ is None else environ
    unknown = unknown_env_settings(env)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]} (environment variable); see docs/configuration.md")
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _read_yaml(config_file)
    try:
        if environ is None:
            return Settings(**file_values)
        # pydantic-settings reads os.environ; a test's explicit environment replaces it.
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            return Settings(**file_values)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None


def require_kek(settings: Settings) -> None:
    """Services that seal or open secrets refuse to start without a KEK."""
    if settings.kek.file is None and settings.kek.value is None:
        raise ConfigError(
            "missing setting kek: set kek.file (ESPLANADE_KEK__FILE) or kek.value (ESPLANADE_KEK__VALUE);"
            " `esplanade kek generate` makes one"
        )
    if settings.kek.file is not None and not settings.kek.file.is_file():
        raise ConfigError(f"bad setting kek.file: {settings.kek.file} is not a readable file")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    dotted = ".".join(str(p) for p in error["loc"])
    env_name = ENV_PREFIX + ENV_NESTED.join(loc).upper()
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        source = f" in {config_file}" if config_file else ""
        return f"unknown setting {dotted}{source}; see docs/configuration.md"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"bad setting {dotted} ({env_name}): {message}{more}"
