"""Evaluation of the generated set: quality control (with regeneration) and the 2.5-D FID."""
