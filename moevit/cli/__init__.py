"""Console scripts of the moevit network package (no grpc or ray here)."""
