"""Training: losses, data-parallel sharding, checkpoints, the loop and its CLI (`python train.py`)."""
