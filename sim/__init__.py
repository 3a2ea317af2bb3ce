"""Simulation and emulation of deployments: link shaping, outages, simulated timings."""
