"""Demonstrations: `python -m demo.manual_sites` (two sites keyed by hand over the Dataplane API)."""
