"""Safe model I/O: load with validated external data, save atomically."""

from onnxprune.io.load import load, source_files
from onnxprune.io.save import data_file_name, save

__all__ = ["data_file_name", "load", "save", "source_files"]
