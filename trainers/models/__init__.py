"""MIL aggregator models (instance embedding + attention pooling + linear head)."""
