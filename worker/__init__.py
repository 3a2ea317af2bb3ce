"""The expert worker daemon (``moe-worker``): serves the experts of some MoE layers over gRPC.

``worker.backends`` runs experts (torch or onnxruntime), ``worker.service`` validates and answers requests,
``worker.server`` loads the hosted experts and runs the gRPC server, ``worker.cli`` is the command line.
Nothing is imported here: importing the package stays cheap and free of torch/grpc.
"""
