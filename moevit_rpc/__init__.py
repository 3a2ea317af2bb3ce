"""RPC layer of moevit: generated gRPC/protobuf code plus the tensor codec shared by coordinator and workers.

The generated code lives in the versioned subpackage ``moevit_rpc.v1`` (from ``proto/moevit_rpc/v1/expert.proto``);
never edit it by hand. Regenerate it with the pinned grpcio-tools::

    .venv/bin/python proto/generate.py          # rewrite
    .venv/bin/python proto/generate.py --check  # exit 1 if the committed code is stale

``moevit_rpc.tensors`` converts between ``torch.Tensor`` and the ``moevit.rpc.v1.Tensor`` message.
"""
