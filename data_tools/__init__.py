"""Offline generators and converters that write ville WebDataset shards (ville never imports this package)."""
