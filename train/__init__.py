"""flaxpod train package."""
