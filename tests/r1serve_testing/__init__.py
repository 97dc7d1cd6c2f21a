"""Test support that is not part of the product: doubles that run in the test process (the fake Kubernetes
API server) or in processes it spawns (the MoE-layer rank harness, imported by name in each rank).

pytest puts `tests/` on sys.path (pyproject.toml), and spawned processes inherit it; benchmarks add it.
The model-free MockEngine and the faulty KV connector stay in the product: they run inside Ray Serve
replicas, chosen by the application's `engine` argument (runtime/serve/engine_factory.py).
"""
