"""Datasets (TFDS builders and their preparation) and the grain input pipeline."""
