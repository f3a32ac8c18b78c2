"""flaxpod sharding package."""
