"""The dual-stream method (placeholder for the package docstring; replaced below)."""
