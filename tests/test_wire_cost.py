"""The token codec in the cost model and the simulator: measured bytes per number and CPU enter the per-patch
costs (partition.costmodel.coefficients), the nominal size per codec, and the sim's settings."""

from __future__ import annotations

import numpy as np
import pytest
from moevit.partition.costmodel import (
    coefficients,
    parse_stats,
    synthetic_stats,
    synthetic_topology,
    wire_bytes_for,
)
from moevit.sim.config import Settings


def test_codec_sizes_and_cpu_enter_the_per_patch_costs():
    """A codec's bytes per number scale the bytes and transfer time of a patch; its CPU adds to a remote patch's
    time on its site, not to the coordinator's own experts."""
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=256))
    topo = synthetic_topology(3, stats)
    fp16 = coefficients(topo, stats, wire_bytes=2)
    nominal = wire_bytes_for("int8", stats)
    assert nominal == [1 + 2 / ls.dim for ls in stats.layers]  # one byte per number + a float16 scale per token
    assert wire_bytes_for("int4+zstd", stats) == [0.5 + 2 / 32] * 3  # before the zstd stage: an upper bound
    int8 = coefficients(topo, stats, wire_bytes=nominal, codec_s_per_value=1e-9)
    np.testing.assert_allclose(int8.patch_bytes, fp16.patch_bytes * np.array(nominal) / 2)
    c = fp16.coordinator
    remote = [j for j in range(len(fp16.sites)) if j != c]
    np.testing.assert_allclose(int8.patch_send_s[:, remote],
                               fp16.patch_send_s[:, remote] * np.array(nominal)[:, None] / 2)
    extra = int8.patch_compute_s - fp16.patch_compute_s
    dims = np.array([ls.dim for ls in stats.layers])
    np.testing.assert_allclose(extra[:, remote], np.repeat((4 * dims * 1e-9)[:, None], len(remote), axis=1))
    assert (extra[:, c] == 0).all()
    with pytest.raises(ValueError, match="wire_bytes"):
        coefficients(topo, stats, wire_bytes=[1.0, 2.0])


def test_sim_settings_take_a_measured_size_or_the_nominal_one():
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=8, num_classes=4, image_size=256))
    assert Settings().wire_bytes(stats) == [2.0, 2.0, 2.0]
    assert Settings(wire="int4").wire_bytes(stats) == wire_bytes_for("int4", stats)
    assert Settings(wire="int8+zstd", wire_bytes_per_value=0.61).wire_bytes(stats) == 0.61
