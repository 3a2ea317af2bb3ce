"""Partitioning a mixture-of-experts model across edge sites.

``partition.profile`` measures the experts, ``partition.costmodel`` prices a placement, ``partition.placement``
searches for one. The topology they work on (``sites.yaml``) is read by :mod:`moevit.deploy.topology`.

Nothing is imported here on purpose: importing the package must stay cheap and free of torch/grpc.
"""
