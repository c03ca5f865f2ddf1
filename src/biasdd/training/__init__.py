"""What the training stages share: run settings, data, networks, augmentation, compute, training."""
