"""The DeepSeek-V3/R1 architecture in PyTorch and its checkpoint I/O."""
