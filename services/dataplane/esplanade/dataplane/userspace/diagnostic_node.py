"""DIAGNOSTIC AND TEST USE ONLY: run the userspace datapath from a JSON file, without IKE.

    python -m esplanade.dataplane.userspace.diagnostic_node CONFIG.json

The file holds `settings` (fields of `DatapathSettings`, enums by value) and either
`routes` for the pass-through transform (no encryption, no integrity: never for real
traffic) or `transform` = "module:function" for a stand-in transform; that function is
called as function(WorkerContext, config_dict) in every worker. The process writes a status
JSON to `status_file` every `status_interval` seconds, exits 0 on SIGTERM/SIGINT, and exits
1 when a worker dies (all others are stopped first).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from esplanade.dataplane.userspace.datapath import (
    DatapathSettings,
    DatapathStartError,
    OuterKind,
    TransformFactory,
    UserspaceDatapath,
)
from esplanade.dataplane.userspace.mtu import DfPolicy
from esplanade.dataplane.userspace.offloads import TunOffloadMode
from esplanade.dataplane.userspace.passthrough_transform import PassThroughRoute, PassThroughTransform
from esplanade.dataplane.userspace.transform import PacketTransform, WorkerContext

log = logging.getLogger("esplanade.dataplane.userspace.diagnostic_node")

_ENUMS: dict[str, Any] = {"outer": OuterKind, "tun_offload_mode": TunOffloadMode, "outer_df": DfPolicy}
_TUPLES = {"addresses", "routes"}


def settings_from_document(doc: dict[str, Any]) -> DatapathSettings:
    known = {f.name for f in dataclasses.fields(DatapathSettings)}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _ENUMS and value is not None:
            values[key] = _ENUMS[key](value)
        elif key in _TUPLES:
            values[key] = tuple(value)
        else:
            values[key] = value
    return DatapathSettings(**values)


def transform_factory_from_document(doc: dict[str, Any]) -> TransformFactory:
    spec = doc.get("transform")
    if spec:
        module_name, _, function_name = str(spec).partition(":")
        function = getattr(importlib.import_module(module_name), function_name)

        def build_custom(context: WorkerContext) -> PacketTransform:
            return function(context, doc)  # type: ignore[no-any-return]

        return build_custom
    routes = [PassThroughRoute.from_document(r) for r in doc.get("routes", [])]

    def build_passthrough(context: WorkerContext) -> PacketTransform:
        return PassThroughTransform(routes, context)

    return build_passthrough


def _write_status(path: Path, status: dict[str, object]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    doc = json.loads(Path(argv[1]).read_text())
    settings = settings_from_document(doc.get("settings", {}))
    datapath = UserspaceDatapath(settings, transform_factory_from_document(doc))
    status_path = Path(doc["status_file"]) if doc.get("status_file") else None
    interval = float(doc.get("status_interval", 0.5))
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        datapath.start()
    except DatapathStartError as exc:
        log.error("%s", exc)
        return 1
    log.info("datapath up: %s", json.dumps({"sizes": datapath.sizes.as_dict() if datapath.sizes else None}))
    code = 0
    try:
        while not stopping:
            if status_path is not None:
                _write_status(status_path, datapath.status())
            failed = datapath.failed_workers()
            if failed and not stopping:  # during a stop, SIGTERM to the process group ends workers too
                log.error("workers %s died; stopping every worker (fail closed)", failed)
                code = 1
                break
            time.sleep(interval)
    finally:
        if status_path is not None and code == 0:
            _write_status(status_path, datapath.status())
        datapath.stop()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
