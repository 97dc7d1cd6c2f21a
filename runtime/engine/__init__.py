"""The inference engine: requests, paged latent KV cache, scheduler, sampling and streaming output."""
