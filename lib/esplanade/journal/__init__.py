"""Local, bounded, append-only record logs (audit, flows, decisions). Never in the store:
they grow with traffic, and a full etcd stops the platform."""
