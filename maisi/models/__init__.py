"""MAISI's networks (MONAI's implementations), variants and checkpoints in the released layouts."""
