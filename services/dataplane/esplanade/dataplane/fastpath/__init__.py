"""The ESP hot loop, compiled: one C call per batch, Python in control.

The pure-Python engine (`esplanade.dataplane.esp`) is the reference and the fallback. This
package puts a compiled batch loop (`_espfast`, C over OpenSSL's EVP API) behind the same
door, chosen by `dataplane.hot_path` (`hot_path.make_esp_batch_core`):

* `esp_batch`: `EspBatchCore` with `CompiledEspBatch` and `PythonEspBatch`: encrypt/decrypt
  batches with SPI lookup, replay window, ESN, lifetimes, sequence reservation, the
  identity's packet filter and flow accounting; results byte-identical between the two.
* `tun_frames`: TSO/USO splitting and GRO-style merging of TUN frames (compiled only; the
  datapath's pure-Python segmentation is the fallback).
* `packet_batch`: `PacketBatch`, packets in one buffer plus (offset, length, tag) spans.
* `filter_tables`, `flow_accounting`: the identity filter and the flow table, both forms.

Building: the package's hatch build hook (hatch_build.py) compiles `csrc/` with the system C
compiler against libcrypto; without a compiler or libssl-dev the install still succeeds and
`hot_path_status` says why the pure-Python loop runs.
"""

from esplanade.dataplane.fastpath.esp_batch import (
    CompiledEspBatch,
    EspBatchCore,
    PythonEspBatch,
    outbound_selection,
)
from esplanade.dataplane.fastpath.filter_tables import IdentityFilter
from esplanade.dataplane.fastpath.flow_accounting import INBOUND, OUTBOUND, FlowRecord
from esplanade.dataplane.fastpath.hot_path import (
    HotPathStatus,
    HotPathUnavailable,
    hot_path_status,
    load_compiled,
    make_esp_batch_core,
)
from esplanade.dataplane.fastpath.packet_batch import PacketBatch

__all__ = [
    "INBOUND",
    "OUTBOUND",
    "CompiledEspBatch",
    "EspBatchCore",
    "FlowRecord",
    "HotPathStatus",
    "HotPathUnavailable",
    "IdentityFilter",
    "PacketBatch",
    "PythonEspBatch",
    "hot_path_status",
    "load_compiled",
    "make_esp_batch_core",
    "outbound_selection",
]
