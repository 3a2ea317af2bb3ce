"""The deployment layer: what a deployment is, as files and as validated frozen dataclasses (no torch, grpc or ray).

- :mod:`moevit.deploy.config`: strict YAML/JSON reading, :class:`~moevit.deploy.config.ConfigError` and the one
  set of value checkers every config reader uses;
- :mod:`moevit.deploy.topology`: ``sites.yaml`` (sites, devices, links, RPC options) and placement files;
- :mod:`moevit.deploy.files`: atomic writes.

The coordinator, the worker, the partitioner, the simulator and the exporters all read their files through here.
Nothing is imported here on purpose: ``import moevit.deploy`` stays cheap.
"""
