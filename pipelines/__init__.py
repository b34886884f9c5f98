"""Ray Data stages: slide discovery, ledger, tissue, tiling, shards, ingest."""
