"""Partitioning a mixture-of-experts model across edge sites.

``partition.topology`` reads ``sites.yaml`` (which sites exist, their devices, the radio links between them,
where each expert lives); it is the one loader the partitioner, the coordinator and the simulator share.

Nothing is imported here on purpose: importing the package must stay cheap and free of torch/grpc.
"""
