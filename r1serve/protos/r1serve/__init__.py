"""Stubs of protos/r1serve/ (generated)."""
