"""flaxpod tools package."""
