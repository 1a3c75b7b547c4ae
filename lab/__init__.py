"""Experiments outside the library: XLA fusion reports, guideline experiments, low-precision
error measurements, and named implementation variants."""
