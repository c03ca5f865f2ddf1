"""What the training stages share: the run settings, data, networks, augmentation, compute settings, training."""
