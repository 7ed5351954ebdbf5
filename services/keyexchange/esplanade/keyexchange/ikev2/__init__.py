"""The IKEv2 protocol core: sans-IO, deterministic, driven by bytes, events and `now`."""
