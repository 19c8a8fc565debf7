"""Shared vocabulary of every stage: file I/O and sidecars, provenance, logs, cluster placement,
input checks, seeds, the label dictionary, body regions and the body mask, tables, the shard loop
and figures. Imports nothing from the other subpackages."""
