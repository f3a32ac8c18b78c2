"""flaxpod data package."""
