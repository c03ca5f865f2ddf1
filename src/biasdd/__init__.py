"""biasdd: dataset distillation under dataset bias (CMNIST-DD, CCIFAR10-DD; DC, DSA, DM) as a DVC pipeline."""

__version__ = "0.1.0"
