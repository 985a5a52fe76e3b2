"""Datasets (`datasets.py`: builders returning `DataSplits`) and loaders (`loaders.py`)."""
