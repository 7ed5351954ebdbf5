"""`esplanade`: the command-line entry point.

Errors a user can cause (bad configuration, unreachable services) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer

from esplanade.cli.ctl import ctl_app, policy_app
from esplanade.cli.health_report import health_report
from esplanade.cli.kek_commands import kek_app
from esplanade.config.loading import ConfigError, load_settings, require_kek
from esplanade.config.settings import CONFIG_ENV, Settings, default_config_path
from esplanade.runtime import garbage_collection

app = typer.Typer(
    name="esplanade",
    help="Zero-trust IPsec platform: IKEv2 + ESP, least-privilege access, one API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(kek_app, name="kek")
app.add_typer(ctl_app, name="ctl")
app.add_typer(policy_app, name="policy")

SERVICE_MODULES = {
    "keyexchange": "esplanade.keyexchange.service",
    "dataplane": "esplanade.dataplane.service",
    "policy": "esplanade.policy.service",
    "api": "esplanade.api.service",
}

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help=f"YAML config file (or ${CONFIG_ENV}).", show_default=False)
]


def fail(message: str) -> typer.Exit:
    typer.echo(f"esplanade: {message}", err=True)
    return typer.Exit(code=2)


def settings_or_exit(config: Path | None, need_kek: bool = True) -> Settings:
    try:
        settings = load_settings(config or default_config_path())
        if need_kek:
            require_kek(settings)
        return settings
    except ConfigError as exc:
        raise fail(str(exc)) from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"esplanade {package_version('esplanade')}")


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="keyexchange | dataplane | policy | api")],
    config: ConfigOption = None,
) -> None:
    """Run one service in the foreground (one per Kubernetes pod)."""
    if service not in SERVICE_MODULES:
        raise fail(f"unknown service {service!r}; choose one of {', '.join(SERVICE_MODULES)}")
    settings = settings_or_exit(config)
    module = importlib.import_module(SERVICE_MODULES[service])
    garbage_collection.tune()
    garbage_collection.freeze()  # the imported modules; run_service freezes its set-up too
    try:
        asyncio.run(module.serve(settings))
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


@app.command()
def up(
    config: ConfigOption = None,
    etcd: Annotated[
        str | None, typer.Option(help="Use etcd at host:port instead of the embedded store.", show_default=False)
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Directory of the embedded store and local logs.", show_default=False)
    ] = None,
) -> None:
    """Run all four services on this machine until Ctrl-C."""
    from esplanade.runtime.supervisor import Supervisor, child_argv

    env = dict(os.environ)
    if config is not None:
        env[CONFIG_ENV] = str(config.resolve())
    if etcd is not None:
        env["ESPLANADE_STORE__BACKEND"] = "etcd"
        env["ESPLANADE_STORE__ETCD_ENDPOINTS"] = f'["{etcd}"]'
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        env.setdefault("ESPLANADE_STORE__PATH", str(state_dir / "store.db"))
        env.setdefault("ESPLANADE_DATAPLANE__FLOW_LOG_PATH", str(state_dir / "flows.db"))
        env.setdefault("ESPLANADE_API__AUDIT_LOG_PATH", str(state_dir / "audit.jsonl"))
        env.setdefault("ESPLANADE_POLICY__AUDIT_LOG_PATH", str(state_dir / "policy-audit.db"))
    # Check the configuration once, here, so a mistake is one line and not four.
    try:
        settings = load_settings(Path(env[CONFIG_ENV]) if CONFIG_ENV in env else None, env)
        require_kek(settings)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if settings.store.backend == "embedded":
        settings.store.path.parent.mkdir(parents=True, exist_ok=True)
    raise typer.Exit(asyncio.run(Supervisor(child_argv(), env).run()))


@app.command()
def health(
    config: ConfigOption = None,
    wait: Annotated[float, typer.Option(help="Wait up to this many seconds for all to be SERVING.")] = 0.0,
) -> None:
    """Report the health of every service (gRPC health checking, and /readyz of the API)."""
    settings = settings_or_exit(config, need_kek=False)
    ok = asyncio.run(health_report(settings, wait))
    raise typer.Exit(0 if ok else 1)


config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration and exit."""
    settings_or_exit(config)
    typer.echo("configuration ok")


@config_app.command("docs")
def config_docs() -> None:
    """Print docs/configuration.md: every setting, its variable and default."""
    from esplanade.config.reference import configuration_reference

    sys.stdout.write(configuration_reference())


if __name__ == "__main__":
    app()
