"""The coordinator: runs the trunk and routers on the camera site and sends routed patch tokens to the expert
workers over gRPC (``moe-coordinator``)."""
