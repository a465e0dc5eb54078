"""Evaluation data: the cached real MNIST, .npz files and ONNX test_data_set folders."""

from weightless_cli.data.datasets import Dataset, fit_to_input_shape, load_dataset
from weightless_cli.data.mnist import cache_path, fetch_mnist, load_mnist

__all__ = ["Dataset", "cache_path", "fetch_mnist", "fit_to_input_shape", "load_dataset", "load_mnist"]
