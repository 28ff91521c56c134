"""distmnist: the classic MNIST CNN, trained on one CPU, one GPU or many, with Accelerate."""

__version__ = "0.1.0"
