"""Generated CSI v1 protobuf and gRPC modules (`make proto`); never edit by hand."""
