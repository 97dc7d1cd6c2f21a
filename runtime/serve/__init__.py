"""The Ray Serve graph: ingress (gRPC + OpenAI HTTP), prefill and decode pools, routers, KV connectors."""
