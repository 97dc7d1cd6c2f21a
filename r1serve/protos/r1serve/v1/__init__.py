"""Stubs of protos/r1serve/v1/*.proto: inference_pb2, inference_pb2_grpc (generated at build time)."""
