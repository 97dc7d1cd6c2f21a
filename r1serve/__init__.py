"""r1serve: serving DeepSeek-R1-class MoE models with prefill/decode pools and expert parallelism."""

__version__ = "0.1.0"
