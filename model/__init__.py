"""flaxpod model package."""
