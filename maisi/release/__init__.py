"""Immutable, versioned releases of the synthetic dataset (build, data card, list/diff/verify, CLI).

Command line::

    python -m maisi.release list [--root results/releases]
    python -m maisi.release diff <release_dir_a> <release_dir_b>    # exit 1 when different
    python -m maisi.release verify <release_dir>                    # exit 1 on mismatches
"""
