"""Generated gRPC stubs of protos/ (built at install time from the .proto files, never edited)."""
