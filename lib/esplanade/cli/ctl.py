"""`esplanade ctl` and `esplanade policy`: the REST API from the command line (httpx only).

URL and token: ``--url``/``--token``, else ``ESPLANADE_CTL_URL``/``ESPLANADE_CTL_TOKEN``, else
``~/.config/esplanade/ctl.yaml`` (``url: ...``, ``token: ...``). Output: ``-o table|json|yaml``.
Errors are one line on stderr (the problem's detail and fields), exit status 1.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

CONFIG_PATH = Path("~/.config/esplanade/ctl.yaml")
console = Console()

ctl_app = typer.Typer(help="Manage Esplanade through its REST API.", no_args_is_help=True)
policy_app = typer.Typer(help="Policy as code through the REST API.", no_args_is_help=True)

Output = Annotated[str, typer.Option("--output", "-o", help="table | json | yaml")]
FileOption = Annotated[Path, typer.Option("--file", "-f", help="YAML or JSON file.", exists=True, dir_okay=False)]


class Session:
    def __init__(self, url: str | None, token: str | None) -> None:
        config: dict[str, Any] = {}
        path = CONFIG_PATH.expanduser()
        if path.exists():
            config = yaml.safe_load(path.read_text()) or {}
        self.url = (url or os.environ.get("ESPLANADE_CTL_URL") or config.get("url") or "http://127.0.0.1:8080").rstrip(
            "/"
        )
        self.token = token or os.environ.get("ESPLANADE_CTL_TOKEN") or config.get("token") or ""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise fail(problem_text(response))
        return response

    def items(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        query = dict(params or {})
        while True:
            page = self.request("GET", path, params=query).json()
            out += page["items"]
            if not page.get("next_cursor"):
                return out
            query["cursor"] = page["next_cursor"]


def problem_text(response: httpx.Response) -> str:
    try:
        problem = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    fields = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in problem.get("errors", []))
    detail = problem.get("detail") or problem.get("title", "")
    return f"{response.status_code} {detail}" + (f" ({fields})" if fields and fields not in detail else "")


def fail(message: str) -> typer.Exit:
    typer.echo(f"esplanade: {message}", err=True)
    return typer.Exit(1)


_session: Session | None = None


@ctl_app.callback()
@policy_app.callback()
def connect(
    url: Annotated[str | None, typer.Option(help="API URL (or ESPLANADE_CTL_URL).")] = None,
    token: Annotated[str | None, typer.Option(help="API token (or ESPLANADE_CTL_TOKEN).")] = None,
) -> None:
    global _session
    _session = Session(url, token)


def session() -> Session:
    assert _session is not None
    return _session


def show(data: Any, output: str, columns: list[str] | None = None, title: str = "") -> None:
    if output == "json":
        typer.echo(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        rows = data if isinstance(data, list) else [data]
        cols = columns or (list(rows[0].keys()) if rows else [])
        table = Table(title=title or None)
        for col in cols:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in cols))
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def load_file(path: Path) -> Any:
    text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise fail(f"{path}: not YAML/JSON: {exc}") from None


# -- CRUD resources ----------------------------------------------------------------------------
RESOURCES = {
    # command: (API path, key field, table columns)
    "connections": (
        "connections",
        "name",
        ["name", "local_addrs", "remote_addrs", "local", "remote", "children", "revision"],
    ),
    "identities": ("identities", "id", ["id", "kind", "ike_ids", "groups", "revision"]),
    "groups": ("groups", "id", ["id", "description", "revision"]),
    "sites": ("sites", "id", ["id", "networks", "revision"]),
    "resources": ("resources", "id", ["id", "destination", "protocol", "ports", "site", "revision"]),
    "rules": ("rules", "id", ["id", "groups", "resources", "conditions", "revision"]),
    "pools": ("pools", "name", ["name", "addrs", "dns", "subnets", "revision"]),
    "certificates": ("certificates", "name", ["name", "subject", "issuer", "not_after", "fingerprint_sha256"]),
    "cas": ("cas", "name", ["name", "subject", "not_after", "fingerprint_sha256"]),
    "crls": ("crls", "name", ["name", "issuer", "next_update", "revoked"]),
}


def add_resource_commands(command: str, path: str, key: str, columns: list[str]) -> None:
    group = typer.Typer(help=f"{command}: list, get, create, apply, delete.", no_args_is_help=True)

    @group.command("list")
    def list_(output: Output = "table") -> None:
        show(session().items(f"/api/v1/{path}"), output, columns, command)

    @group.command("get")
    def get(name: str, output: Output = "yaml") -> None:
        show(session().request("GET", f"/api/v1/{path}/{name}").json(), output, columns)

    @group.command("create")
    def create(file: FileOption, output: Output = "table") -> None:
        """Create from a file (one object, or a list)."""
        documents = load_file(file)
        for document in documents if isinstance(documents, list) else [documents]:
            show(session().request("POST", f"/api/v1/{path}", json=document).json(), output, columns)

    @group.command("apply")
    def apply(file: FileOption, output: Output = "table") -> None:
        """Create or replace from a file (PUT: idempotent)."""
        documents = load_file(file)
        for document in documents if isinstance(documents, list) else [documents]:
            name = document.pop(key, None)
            if not name:
                raise fail(f"{file}: every object needs '{key}'")
            show(session().request("PUT", f"/api/v1/{path}/{name}", json=document).json(), output, columns)

    @group.command("delete")
    def delete(name: str) -> None:
        session().request("DELETE", f"/api/v1/{path}/{name}")
        typer.echo(f"deleted {path}/{name}")

    ctl_app.add_typer(group, name=command)


for _command, (_path, _key, _columns) in RESOURCES.items():
    add_resource_commands(_command, _path, _key, _columns)


# -- tokens ----------------------------------------------------------------------------------
tokens_app = typer.Typer(help="API tokens: list, create, revoke.", no_args_is_help=True)
ctl_app.add_typer(tokens_app, name="tokens")


@tokens_app.command("list")
def tokens_list(output: Output = "table") -> None:
    show(session().items("/api/v1/tokens"), output, ["id", "name", "scope", "created_at", "expires_at"])


@tokens_app.command("create")
def tokens_create(
    name: str,
    scope: Annotated[str, typer.Option(help="admin | operator | read-only")] = "read-only",
    output: Output = "table",
) -> None:
    """Create a token; it is shown this once."""
    created = session().request("POST", "/api/v1/tokens", json={"name": name, "scope": scope}).json()
    show(created, output, ["id", "name", "scope", "token"])


@tokens_app.command("revoke")
def tokens_revoke(token_id: str) -> None:
    session().request("DELETE", f"/api/v1/tokens/{token_id}")
    typer.echo(f"revoked {token_id}")


# -- live ----------------------------------------------------------------------------------------
def _when(ts: float) -> str:
    if not ts:
        return "-"
    delta = int(ts - datetime.datetime.now(datetime.UTC).timestamp())
    return f"{-delta}s ago" if delta <= 0 else f"in {delta}s"


def render_sas(sas: list[dict[str, Any]]) -> str:
    """The `swanctl --list-sas` layout."""
    lines: list[str] = []
    for sa in sas:
        mine, theirs = ("*", "") if sa["initiator"] else ("", "*")
        lines.append(
            f"{sa['connection']}: #{sa['id']}, {sa['state']}, IKEv2, {sa['spi_i']}_i{mine} {sa['spi_r']}_r{theirs}"
        )
        nat_l, nat_r = (" [NAT]" if sa["nat_local"] else ""), (" [NAT]" if sa["nat_remote"] else "")
        lines.append(f"  local  '{sa['local_id']}' @ {sa['local_addr']}[{sa['local_port']}]{nat_l}")
        lines.append(f"  remote '{sa['remote_id']}' @ {sa['remote_addr']}[{sa['remote_port']}]{nat_r}")
        if sa["virtual_ips"]:
            lines.append(f"  virtual IPs {' '.join(sa['virtual_ips'])}")
        lines.append(f"  {sa['proposal']}")
        lines.append(f"  established {_when(sa['established_at'])}, rekeying {_when(sa['rekey_at'])}")
        for child in sa["children"]:
            encap = ", UDP-encap" if child["encap"] else ""
            head = f"  {child['name']}: #{child['id']}, {child['state']}, {child['mode']}, {child['protocol']}{encap}"
            lines.append(f"{head}: {child['proposal']}")
            installed, rekeying = _when(child["established_at"]), _when(child["rekey_at"])
            lines.append(f"    installed {installed}, rekeying {rekeying}, expires {_when(child['expire_at'])}")
            lines.append(f"    in  {child['spi_in']}, {child['bytes_in']:>10} bytes, {child['packets_in']:>8} packets")
            lines.append(
                f"    out {child['spi_out']}, {child['bytes_out']:>10} bytes, {child['packets_out']:>8} packets"
            )
            lines.append(f"    local  {' '.join(child['local_ts'])}")
            lines.append(f"    remote {' '.join(child['remote_ts'])}")
    return "\n".join(lines)


@ctl_app.command("sas")
def sas(
    connection: Annotated[str | None, typer.Option("--ike", help="Only this connection.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text | json | yaml")] = "text",
) -> None:
    """IKE and Child SAs, as `swanctl --list-sas` shows them."""
    items = session().items("/api/v1/sas", {"connection": connection} if connection else None)
    if output == "text" or output == "table":
        typer.echo(render_sas(items) or "no SAs")
    else:
        show(items, output)


@ctl_app.command("initiate")
def initiate(connection: str, child: Annotated[str, typer.Option(help="Only this child.")] = "") -> None:
    reply = session().request("POST", f"/api/v1/connections/{connection}/initiate", json={"child": child}).json()
    typer.echo(f"initiating {connection}: IKE SA {reply['ike_sa']} ({reply['location']})")


@ctl_app.command("terminate")
def terminate(
    ike_sa: str, child_sa: Annotated[str | None, typer.Option("--child", help="Only this Child SA.")] = None
) -> None:
    path = f"/api/v1/sas/{ike_sa}" + (f"/children/{child_sa}" if child_sa else "") + "/terminate"
    session().request("POST", path)
    typer.echo(f"terminating {child_sa or ike_sa}")


@ctl_app.command("rekey")
def rekey(
    ike_sa: str,
    child_sa: Annotated[str | None, typer.Option("--child", help="Only this Child SA.")] = None,
    reauth: Annotated[bool, typer.Option(help="Reauthenticate the IKE SA.")] = False,
) -> None:
    if child_sa:
        session().request("POST", f"/api/v1/sas/{ike_sa}/children/{child_sa}/rekey")
    else:
        session().request("POST", f"/api/v1/sas/{ike_sa}/rekey", json={"reauth": reauth})
    typer.echo(f"rekeying {child_sa or ike_sa}")


@ctl_app.command("counters")
def counters(
    ike_sa: Annotated[str | None, typer.Argument(help="Only the Child SAs of this IKE SA.")] = None,
    output: Output = "table",
) -> None:
    path = f"/api/v1/sas/{ike_sa}/counters" if ike_sa else "/api/v1/counters"
    data = session().request("GET", path).json()
    if output == "table":
        show(data["sas"], output, ["child_sa", "spi", "direction", "packets", "bytes", "owner"], f"node {data['node']}")
        if data["drops"]:
            show(data["drops"], output, ["reason", "packets"], "drops")
    else:
        show(data, output)


def sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    event, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield event, data
            event, data = "message", ""


@ctl_app.command("events")
def events(
    kinds: Annotated[str | None, typer.Option(help="Comma-separated kinds to keep.")] = None,
    count: Annotated[int, typer.Option(help="Stop after this many events (0: follow).")] = 0,
    output: Annotated[str, typer.Option("--output", "-o", help="text | json")] = "text",
) -> None:
    """Follow the event stream (Server-Sent Events)."""
    params: dict[str, Any] = {"limit": count}
    if kinds:
        params["kinds"] = kinds
    s = session()
    try:
        with s.client.stream("GET", "/api/v1/events", params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise fail(problem_text(response))
            for kind, data in sse(response.iter_lines()):
                if output == "json":
                    typer.echo(data)
                else:
                    doc = json.loads(data)
                    extra = " ".join(f"{k}={v}" for k, v in doc.items() if k not in ("kind", "time", "source") and v)
                    typer.echo(f"{kind:<16} {extra}")
    except httpx.HTTPError as exc:
        raise fail(f"event stream ended: {exc}") from None


@ctl_app.command("audit")
def audit(
    actor: Annotated[str | None, typer.Option()] = None,
    action: Annotated[str | None, typer.Option()] = None,
    result: Annotated[str | None, typer.Option()] = None,
    since: Annotated[float | None, typer.Option(help="POSIX seconds.")] = None,
    output: Output = "table",
) -> None:
    params = {k: v for k, v in {"actor": actor, "action": action, "result": result, "since": since}.items() if v}
    show(session().items("/api/v1/audit", params), output, ["id", "time", "actor", "action", "target", "result"])


def _seconds(value: str | None) -> float | None:
    """POSIX seconds, an ISO 8601 time, or a span back from now (`90s`, `15m`, `2h`, `7d`)."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.datetime.now(datetime.UTC).timestamp() - float(value[:-1]) * units[value[-1]]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{value!r} is not a time: POSIX seconds, ISO 8601, or 15m / 2h / 7d ago") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)).timestamp()


def _stamp(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "-"


@ctl_app.command("logs")
def logs(
    kind: Annotated[str, typer.Argument(help="audit | flows")],
    identity: Annotated[str | None, typer.Option(help="flows: peer identity; audit: the actor.")] = None,
    resource: Annotated[str | None, typer.Option(help="flows: policy resource; audit: the target path.")] = None,
    decision: Annotated[str | None, typer.Option(help="flows: allow | deny; audit: the result.")] = None,
    connection: Annotated[str | None, typer.Option(help="flows: only this connection.")] = None,
    since: Annotated[str | None, typer.Option(help="POSIX seconds, ISO 8601, or 15m / 2h / 7d ago.")] = None,
    until: Annotated[str | None, typer.Option(help="As --since.")] = None,
    active: Annotated[bool, typer.Option(help="flows: also the flows still running.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="table | json | yaml | jsonl")] = "table",
) -> None:
    """The audit log or the flow log, filtered (jsonl: one record a line, for a SIEM)."""
    times = {"since": _seconds(since), "until": _seconds(until)}
    if kind == "audit":
        fields = {"actor": identity, "target": resource, "result": decision}
        columns = ["id", "time", "actor", "action", "target", "result"]
        path = "/api/v1/audit"
        if connection or active:
            raise fail("--connection and --active apply to flows only")
    elif kind == "flows":
        fields = {"identity": identity, "resource": resource, "decision": decision, "connection": connection}
        columns = ["start", "end", "identity", "resource", "src", "dst", "protocol", "dst_port", "direction"]
        columns += ["bytes", "packets", "decision"]
        path = "/api/v1/flows"
    else:
        raise fail(f"no log {kind!r}: audit or flows")
    params: dict[str, Any] = {k: v for k, v in {**fields, **times}.items() if v is not None}
    if active:
        params["active"] = "true"
    records = session().items(path, params)
    if output == "jsonl":
        for record in records:
            typer.echo(json.dumps(record, separators=(",", ":")))
        return
    if output == "table":
        for record in records:
            for key in ("time", "start", "end"):
                if key in record:
                    record[key] = _stamp(float(record[key]))
    show(records, output, columns, kind)


@ctl_app.command("status")
def status(output: Output = "table") -> None:
    """The platform at a glance: services, nodes, tunnels up or down and why, top talkers."""
    data = session().request("GET", "/api/v1/status").json()
    if output != "table":
        show(data, output)
        return
    services = [{"service": name, "state": state} for name, state in data["services"].items()]
    show(services, output, ["service", "state"], "services")
    show(data["nodes"], output, ["name", "backend"], "nodes")
    tunnels = [{**t, "state": "up" if t["up"] else "DOWN", "since": _when(t["since"])} for t in data["tunnels"]]
    show(tunnels, output, ["connection", "state", "reason", "ike_sas", "child_sas", "since"], "tunnels")
    show(data["top_talkers"], output, ["identity", "connection", "bytes", "packets"], "top talkers")
    for error in data["errors"]:
        typer.echo(f"could not read {error}", err=True)


# -- policy as code -------------------------------------------------------------------------------
def _changes(result: dict[str, Any]) -> None:
    for change in result["changes"]:
        typer.echo(change["detail"])
    if not result["changes"]:
        typer.echo("no changes")
    if result["affected_identities"]:
        typer.echo(f"identities affected: {', '.join(result['affected_identities'])}")


@policy_app.command("apply")
def policy_apply(
    file: FileOption, dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the changes.")] = False
) -> None:
    """Make the stored policy equal the file, all or nothing."""
    result = (
        session().request("POST", "/api/v1/policy/apply", json={"policy": file.read_text(), "dry_run": dry_run}).json()
    )
    _changes(result)
    typer.echo("applied" if result["applied"] else "not applied (dry run)" if dry_run else "nothing to apply")


@policy_app.command("diff")
def policy_diff(file: FileOption) -> None:
    _changes(session().request("POST", "/api/v1/policy/diff", json={"policy": file.read_text()}).json())


@policy_app.command("export")
def policy_export() -> None:
    sys.stdout.write(session().request("GET", "/api/v1/policy/export").text)


@policy_app.command("what-if")
def policy_what_if(
    file: FileOption,
    identity: Annotated[str, typer.Option(help="Policy identity.")],
    src: Annotated[str, typer.Option(help="Source address (inside the tunnel).")],
    dst: Annotated[str, typer.Option(help="Destination address.")],
    protocol: Annotated[str, typer.Option(help="tcp | udp | icmp | icmpv6 | number")] = "tcp",
    port: Annotated[int, typer.Option(help="Destination port (ICMP: type<<8|code).")] = 0,
) -> None:
    """The decision for one flow now, and under the file."""
    body = {
        "policy": file.read_text(),
        "identity": identity,
        "flow": {
            "src": src,
            "dst": dst,
            "protocol": int(protocol) if protocol.isdigit() else protocol,
            "dst_port": port,
        },
    }
    result = session().request("POST", "/api/v1/policy/what-if", json=body).json()
    for label in ("current", "desired"):
        d = result[label]
        typer.echo(f"{label:<8} {'allow' if d['allow'] else 'deny':<6} {d['rule']}: {d['reason']}")
    typer.echo("changes" if result["changed"] else "unchanged")
