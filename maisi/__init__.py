"""Synthetic CT data factory built on NVIDIA's MAISI method and MONAI.

All of the workflow's logic lives in this package, in small modules named for what they do;
the Snakemake rules only wire them together.
"""

__version__ = "0.1.0"
