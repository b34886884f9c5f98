"""ICMIL: the bag classifier and the tile embedder trained in turns (rounds of train → distill → embed)."""
