"""Generated code of protocol version v1 (package ``moevit.rpc.v1``): ``expert_pb2`` (messages),
``expert_pb2.pyi`` (type stubs) and ``expert_pb2_grpc`` (ExpertService stub, servicer, registration).

Generated from ``proto/moevit_rpc/v1/expert.proto``; do not edit. Regenerate with::

    .venv/bin/python proto/generate.py
"""
