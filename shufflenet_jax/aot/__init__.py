"""Ahead-of-time compilation for accelerators this machine does not have."""
