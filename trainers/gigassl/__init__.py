"""Giga-SSL: self-supervised slide embeddings (sparse-conv encoder, global NT-Xent) and their linear probe."""
