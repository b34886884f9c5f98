"""CDMA: semi-supervised tissue segmentation (MTNet) on the tile shards, its inference and metrics."""
