"""The inference runtime: model, engine, parallelism and the Ray Serve graph."""
