"""The linear probe's scale options, kept apart from the probe so that the command line can offer them
without importing scikit-learn and torch."""

SCALES = ("standard", "none")  # per-dimension standardisation of the embeddings, or the official raw probe
