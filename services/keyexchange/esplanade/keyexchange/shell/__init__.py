"""Shells: the I/O around the sans-IO IKE core."""
