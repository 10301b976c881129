"""Several processes: the torchrun world, its process group and ranks."""
