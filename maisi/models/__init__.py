"""MAISI's networks (MONAI's implementations), presets and checkpoints in the released layouts."""
