"""The topology loader (deploy/topology.py): the examples load, every validation rule names file + key
path, hostile YAML is refused without side effects, placements (inline, file, default) and their checks."""

from __future__ import annotations

import ast
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from moevit.deploy.topology import (
    MAX_FILE_BYTES,
    Device,
    Link,
    Placement,
    Site,
    Topology,
    TopologyError,
    default_placement,
    load_placement,
    load_topology,
    parse_placement,
    parse_topology,
    save_placement,
    validate_placement,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sites.yaml"
EXAMPLE_LORA = ROOT / "examples" / "sites-lora.yaml"
SITES = ("camera-01", "pi-north", "pi-south")


def base() -> dict[str, Any]:
    """A valid topology as plain data; each test breaks one thing."""
    return {
        "model": "m.safetensors",
        "coordinator": "camera-01",
        "sites": {
            "camera-01": {
                "address": "127.0.0.1:50050",
                "device": {"gflops": 8, "memory_mb": 512, "active_w": 4.5, "idle_w": 1.8},
            },
            "pi-north": {
                "address": "127.0.0.1:50051",
                "device": {"gflops": 4, "memory_mb": 256, "active_w": 3.5, "idle_w": 0.9, "battery_wh": 37},
            },
            "pi-south": {
                "address": "127.0.0.1:50052",
                "device": {"gflops": 3, "memory_mb": 128, "active_w": 3.0, "idle_w": 0.8},
            },
        },
        "links": [
            {"between": ["camera-01", "pi-north"], "bandwidth_mbps": 20, "latency_ms": 4},
            {"between": ["camera-01", "pi-south"], "bandwidth_mbps": 12, "latency_ms": 6, "loss": 0.01},
            {"between": ["pi-north", "pi-south"], "bandwidth_mbps": 10, "latency_ms": 8},
        ],
    }


def refused(fn: Any, *args: Any, **kwargs: Any) -> TopologyError:
    """The TopologyError ``fn`` raises. Tests check its ``problem``/``key_path``, not ``str(err)``, because
    ``str(err)`` holds the tmp path, which holds the test's name and would match almost anything."""
    with pytest.raises(TopologyError) as info:
        fn(*args, **kwargs)
    return info.value


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- examples


def test_example_loads():
    topo = load_topology(EXAMPLE)
    assert topo.path == str(EXAMPLE)
    assert topo.coordinator == "camera-01"
    assert tuple(topo.sites) == SITES
    assert topo.site("pi-north").address == "127.0.0.1:50051"
    assert (topo.site("pi-south").host, topo.site("pi-south").port) == ("127.0.0.1", 50052)
    assert [s.name for s in topo.remote_sites()] == ["pi-north", "pi-south"]
    # relative to the file's folder, or to the working folder (the project root here) when only that one exists
    from_root = ROOT / "runs" / "demo" / "moe.safetensors"
    beside = EXAMPLE.parent / "runs" / "demo" / "moe.safetensors"
    assert topo.model == (from_root if from_root.exists() and not beside.exists() else beside)
    assert topo.placement is None and topo.placement_source is None
    assert topo.fallback == "fail"
    assert len(topo.links) == 3
    link = topo.link_between("pi-north", "camera-01")
    assert link is topo.link_between("camera-01", "pi-north")
    assert (link.a, link.b, link.bandwidth_mbps, link.latency_ms) == ("camera-01", "pi-north", 20.0, 4.0)
    for s in topo.sites.values():  # Raspberry-Pi class
        assert 1 <= s.device.gflops <= 20 and 128 <= s.device.memory_mb <= 512 and 3 <= s.device.active_w <= 5


def test_lora_example_has_a_duty_cycled_link():
    topo = load_topology(EXAMPLE_LORA)
    lora = [link for link in topo.links if link.duty_cycle < 1]
    assert lora and all(link.bandwidth_mbps <= 0.1 and link.latency_ms >= 50 for link in lora)
    assert topo.link_between("pi-south", "camera-01").duty_cycle == pytest.approx(0.01)


def test_example_runs_with_the_default_placement():
    topo = load_topology(EXAMPLE)
    placement = topo.resolve_placement({8: 16})
    assert placement == default_placement(topo, {8: 16})
    assert set(placement.sites()) == set(SITES)


def test_link_between_missing_and_helpers():
    data = base()
    del data["links"][2]
    topo = parse_topology(data)
    assert topo.link_between("pi-north", "pi-south") is None
    assert topo.link_between("pi-north", "pi-north") is None
    assert topo.links[0].other("pi-north") == "camera-01"
    with pytest.raises(KeyError, match="pi-west"):
        topo.site("pi-west")


def test_defaults_and_immutability():
    topo = parse_topology(base())
    link = topo.links[0]
    assert (link.loss, link.tx_nj_per_bit, link.rx_nj_per_bit, link.duty_cycle) == (0.0, 50.0, 25.0, 1.0)
    assert topo.site("camera-01").device.battery_wh is None
    assert topo.site("pi-north").device.battery_wh == 37.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.coordinator = "pi-north"  # type: ignore[misc]
    with pytest.raises(TypeError):
        topo.sites["x"] = topo.sites["pi-north"]  # type: ignore[index]


def test_site_order_in_the_file_does_not_matter():
    data = base()
    data["sites"] = dict(reversed(list(data["sites"].items())))
    assert parse_topology(data) == parse_topology(base())


def test_string_source_resolves_against_base_dir(tmp_path):
    topo = parse_topology(base(), base_dir=tmp_path)
    assert topo.path == "<string>" and topo.model == tmp_path / "m.safetensors"
    data = base()
    data["model"] = str(tmp_path / "abs.safetensors")
    assert parse_topology(data, "/elsewhere/sites.yaml").model == tmp_path / "abs.safetensors"


# ---------------------------------------------------------------------------------------- validation rules


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        data = data[k]
    data[path[-1]] = value


def _del(data: dict[str, Any], path: tuple[Any, ...]) -> None:
    for k in path[:-1]:
        data = data[k]
    del data[path[-1]]


DEV = ("sites", "pi-north", "device")
RULES = [
    # (change, expected key path, expected text)
    (("set", (*DEV, "gflops"), -3), "sites.pi-north.device.gflops", "expected a positive number, got -3"),
    (("set", (*DEV, "gflops"), 0), "sites.pi-north.device.gflops", "expected a positive number, got 0"),
    (("set", (*DEV, "gflops"), True), "sites.pi-north.device.gflops", "got true (a boolean)"),
    (("set", (*DEV, "gflops"), "1e3"), "sites.pi-north.device.gflops", "1.0e3"),
    (("set", (*DEV, "gflops"), float("inf")), "sites.pi-north.device.gflops", "got inf"),
    (("set", (*DEV, "gflops"), float("nan")), "sites.pi-north.device.gflops", "got nan"),
    (("set", (*DEV, "memory_mb"), 0), "sites.pi-north.device.memory_mb", "expected a positive number"),
    (("set", (*DEV, "active_w"), -1), "sites.pi-north.device.active_w", "expected a non-negative number, got -1"),
    (("set", (*DEV, "idle_w"), -0.5), "sites.pi-north.device.idle_w", "expected a non-negative number"),
    (("set", (*DEV, "idle_w"), 9), "sites.pi-north.device.idle_w", "expected at most active_w (3.5), got 9"),
    (("set", (*DEV, "battery_wh"), 0), "sites.pi-north.device.battery_wh", "expected a positive number"),
    (("set", (*DEV, "gflop"), 1), "sites.pi-north.device.gflop", "did you mean 'gflops'?"),
    (("del", (*DEV, "idle_w")), "sites.pi-north.device.idle_w", "missing required key 'idle_w'"),
    (("set", DEV, [1, 2]), "sites.pi-north.device", "expected a mapping, got a list"),
    (("set", ("sites", "pi-north", "adress"), "x:1"), "sites.pi-north.adress", "allowed: address, device"),
    (("del", ("sites", "pi-north", "address")), "sites.pi-north.address", "missing required key"),
    (("set", ("sites", "pi-north", "address"), "127.0.0.1"), "sites.pi-north.address", "no ':port'"),
    (("set", ("sites", "pi-north", "address"), "127.0.0.1:0"), "sites.pi-north.address", "outside 1-65535"),
    (("set", ("sites", "pi-north", "address"), "h:65536"), "sites.pi-north.address", "port 65536 is outside"),
    (("set", ("sites", "pi-north", "address"), "h:http"), "sites.pi-north.address", "port 'http' is not a number"),
    (("set", ("sites", "pi-north", "address"), ":50051"), "sites.pi-north.address", "expected 'host:port'"),
    (("set", ("sites", "pi-north", "address"), "bad host:1"), "sites.pi-north.address", "not a host name"),
    (("set", ("sites", "pi-north", "address"), "300.1.1.1:1"), "sites.pi-north.address", "not an IPv4"),
    (("set", ("sites", "pi-north", "address"), "::1:50051"), "sites.pi-north.address", "needs brackets"),
    (("set", ("sites", "pi-north", "address"), 650), "sites.pi-north.address", "(a string)"),
    (("set", ("sites", "pi-north", "address"), "127.0.0.1:50050"), "sites.pi-north.address", "used by site"),
    (("set", ("sites", False), {}), "sites.False", "quote it"),
    (("set", ("sites", "pi north"), {}), "sites.pi north", "invalid site name"),
    (("set", ("sites",), {}), "sites", "at least one site"),
    (("set", ("sites",), ["camera-01"]), "sites", "expected a mapping"),
    (("set", ("coordinator",), "pi-west"), "coordinator", "unknown site 'pi-west'"),
    (("del", ("coordinator",)), "coordinator", "missing required key 'coordinator'"),
    (("set", ("coordinater",), "camera-01"), "coordinater", "did you mean 'coordinator'?"),
    (("set", ("fallback",), "retry"), "fallback", "expected one of fail, local, nearest, skip, got 'retry'"),
    (("set", ("model",), ""), "model", "expected a file path"),
    (("set", ("placement",), 3), "placement", "expected a placement file path or a mapping"),
    (("set", ("links",), {"a": 1}), "links", "expected a list of links"),
    (("set", ("links", 1, "between", 1), "pi-west"), "links[1].between[1]", "unknown site 'pi-west'"),
    (("set", ("links", 1, "between"), ["camera-01"]), "links[1].between", "expected a list of two site names"),
    (("set", ("links", 1, "between"), ["pi-south", "pi-south"]), "links[1].between", "to itself"),
    (("set", ("links", 2, "between"), ["pi-north", "camera-01"]), "links[2].between", "duplicate link"),
    (("set", ("links", 0, "bandwidth_mbps"), -20), "links[0].bandwidth_mbps", "expected a positive number, got -20"),
    (("set", ("links", 0, "bandwidth_mbps"), 0), "links[0].bandwidth_mbps", "expected a positive number"),
    (("set", ("links", 0, "latency_ms"), -1), "links[0].latency_ms", "expected a non-negative number"),
    (("set", ("links", 0, "loss"), 1.0), "links[0].loss", "expected a number in [0, 1), got 1.0"),
    (("set", ("links", 0, "loss"), -0.1), "links[0].loss", "expected a number in [0, 1)"),
    (("set", ("links", 0, "duty_cycle"), 0), "links[0].duty_cycle", "expected a number in (0, 1]"),
    (("set", ("links", 0, "duty_cycle"), 1.5), "links[0].duty_cycle", "expected a number in (0, 1]"),
    (("set", ("links", 0, "tx_nj_per_bit"), -5), "links[0].tx_nj_per_bit", "expected a non-negative number"),
    (("set", ("links", 0, "rx_nj_per_bit"), "x"), "links[0].rx_nj_per_bit", "expected a non-negative number"),
    (("set", ("links", 0, "speed"), 1), "links[0].speed", "unknown key 'speed'"),
    (("del", ("links", 0, "latency_ms")), "links[0].latency_ms", "missing required key"),
    (("del", ("links", 1)), "sites.pi-south", "no link to the coordinator 'camera-01'"),
    (("set", ("placement",), {8: {"pi-west": [0]}}), "placement.8.pi-west", "unknown site 'pi-west'"),
    (("set", ("placement",), {8: {"pi-north": [0, 0]}}), "placement.8.pi-north[1]", "listed twice"),
    (("set", ("placement",), {8: {"pi-north": [-1]}}), "placement.8.pi-north[0]", "non-negative integer"),
    (("set", ("placement",), {"x": {"pi-north": [0]}}), "placement.x", "expected a layer index"),
    (("set", ("placement",), {8: {}}), "placement.8", "at least one site"),
    (("set", ("placement",), {8: {"pi-north": [0]}, "8": {"pi-south": [1]}}), "placement.8", "listed twice"),
    (("set", ("rpc",), {"stream": "yes"}), "rpc.stream", "expected true or false, got 'yes'"),
    (("set", ("rpc",), {"streams": True}), "rpc.streams", "did you mean 'stream'?"),
    (("set", ("rpc",), {"packed": 1}), "rpc.packed", "expected true or false, got 1"),
    (("set", ("rpc",), {"codec": "int3"}), "rpc.codec", "unknown codec 'int3' (allowed: fp32, fp16"),
    (("set", ("rpc",), {"codec": 8}), "rpc.codec", "expected a codec name, got 8"),
    (("set", ("sites", "pi-north", "rpc"), {"codec": "int8+gzip"}), "sites.pi-north.rpc.codec",
     "unknown codec 'int8+gzip'"),
    (("set", ("sites", "pi-north", "rpc"), {"codecs": "int8"}), "sites.pi-north.rpc.codecs", "did you mean 'codec'?"),
    (("set", ("sites", "pi-north", "rpc"), "int8"), "sites.pi-north.rpc", "expected a mapping"),
]


@pytest.mark.parametrize(("change", "key_path", "text"), RULES, ids=[f"{r[1]}:{r[2][:30]}" for r in RULES])
def test_each_rule_names_file_and_key_path(change, key_path, text):
    data = base()
    if change[0] == "set":
        _set(data, change[1], change[2])
    else:
        _del(data, change[1])
    with pytest.raises(TopologyError) as info:
        parse_topology(data, "field/sites.yaml")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.file, err.key_path) == ("field/sites.yaml", key_path), str(err)
    assert text in err.problem, str(err)
    assert str(err).startswith(f"field/sites.yaml: {key_path}: ")


def test_codec_per_site_overrides_the_topology_default():
    topo = parse_topology(base(), "t.yaml")
    assert topo.rpc.codec == "fp16" and topo.codec_for("pi-north") == "fp16"  # as before codecs existed
    data = base()
    data["rpc"] = {"codec": "int8"}
    data["sites"]["pi-south"]["rpc"] = {"codec": "int4+zstd"}
    topo = parse_topology(data, "t.yaml")
    assert (topo.codec_for("pi-north"), topo.codec_for("pi-south")) == ("int8", "int4+zstd")


def test_rpc_stream_and_packed_default_on_and_can_be_turned_off():
    rpc = parse_topology(base(), "t.yaml").rpc
    assert (rpc.stream, rpc.packed) == (True, True)
    data = base()
    data["rpc"] = {"stream": False, "packed": False, "deadline_s": 2.0}
    rpc = parse_topology(data, "t.yaml").rpc
    assert (rpc.stream, rpc.packed, rpc.deadline_s) == (False, False, 2.0)


def test_base_is_valid():
    # the rules above break exactly one thing each: the untouched data must load
    topo = parse_topology(base(), "field/sites.yaml")
    assert len(topo.sites) == 3


def test_several_sites_without_a_coordinator_link_are_all_named():
    data = base()
    data["links"] = [data["links"][2]]
    with pytest.raises(TopologyError, match=r"links: sites with no link to the coordinator 'camera-01': pi-north, pi"):
        parse_topology(data)


def test_coordinator_link_check_can_be_deferred(tmp_path):
    data = base()
    del data["links"][1]
    topo = parse_topology(data, require_coordinator_links=False)
    with pytest.raises(TopologyError, match="pi-south") as info:
        topo.require_links_to_coordinator()
    assert info.value.key_path == "sites.pi-south"
    f = write(
        tmp_path / "s.yaml",
        "coordinator: a\nsites: {a: {address: 'h:1', device: {gflops: 1, memory_mb: 1, "
        "active_w: 1, idle_w: 0}}, b: {address: 'h:2', device: {gflops: 1, memory_mb: 1, active_w: 1, "
        "idle_w: 0}}}\n",
    )
    assert "no link to the coordinator 'a'" in refused(load_topology, f).problem
    assert [s.name for s in load_topology(f, require_coordinator_links=False).remote_sites()] == ["b"]


def test_ipv6_and_hostnames_are_accepted():
    data = base()
    data["sites"]["pi-north"]["address"] = "[::1]:50051"
    data["sites"]["pi-south"]["address"] = "pi-south.local:50052"
    topo = parse_topology(data)
    assert (topo.site("pi-north").host, topo.site("pi-north").port) == ("::1", 50051)
    assert topo.site("pi-south").host == "pi-south.local"


def test_direct_construction_checks_values_too():
    with pytest.raises(TopologyError, match="bandwidth_mbps: expected a positive number, got 0"):
        Link("a", "b", bandwidth_mbps=0, latency_ms=1)
    with pytest.raises(TopologyError, match="to itself"):
        Link("a", "a", bandwidth_mbps=1, latency_ms=1)
    with pytest.raises(TopologyError, match="gflops"):
        Device(gflops=-1, memory_mb=1, active_w=1, idle_w=0)
    with pytest.raises(TopologyError, match="address"):
        Site("a", "nope", Device(1, 1, 1, 0))
    topo = parse_topology(base())
    with pytest.raises(TopologyError, match="coordinator"):
        dataclasses.replace(topo, coordinator="pi-west")
    with pytest.raises(TopologyError, match="fallback"):
        dataclasses.replace(topo, fallback="nope")
    wider = dataclasses.replace(topo.links[0], bandwidth_mbps=40.0)
    assert dataclasses.replace(topo, links=(wider, *topo.links[1:])).link_between("camera-01", "pi-north") == wider


def test_error_survives_reduce():
    # Ray sends a task's exception to the driver through __reduce__; deepcopy rebuilds it through the same path
    err = TopologyError("f.yaml", "sites.a", "bad")
    back = copy.deepcopy(err)
    assert (back.file, back.key_path, back.problem, str(back)) == ("f.yaml", "sites.a", "bad", "f.yaml: sites.a: bad")


# ------------------------------------------------------------------------------------------- hostile YAML

GOOD_YAML = EXAMPLE.read_text(encoding="utf-8")


def test_python_tag_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    f = write(
        tmp_path / "s.yaml", f'coordinator: camera-01\nsites: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert not marker.exists()
    assert info.value.file == str(f) and info.value.key_path == "line 2, column 8"
    assert "!!python/object/apply:os.system" in info.value.problem and "not allowed" in info.value.problem


@pytest.mark.parametrize("tag", ["!!python/object:os.system {}", "!!python/name:os.system ''", "!custom 3"])
def test_other_tags_are_refused(tmp_path, tag):
    f = write(tmp_path / "s.yaml", f"coordinator: camera-01\nsites: {tag}\n")
    assert "is not allowed: config files are plain YAML" in refused(load_topology, f).problem


def test_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    f = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    err = refused(load_topology, f)
    assert time.perf_counter() - t0 < 1.0
    assert "anchors (&name) are not allowed" in err.problem
    assert err.file == str(f) and err.key_path == "line 1, column 5"


def test_aliases_and_merge_keys_are_refused(tmp_path):
    # an alias with no anchor still fails as an alias, not as something else
    err = refused(load_topology, write(tmp_path / "a.yaml", "coordinator: *x\n"))
    assert "aliases (*name) are not allowed" in err.problem and err.key_path == "line 1, column 14"
    err = refused(load_topology, write(tmp_path / "m.yaml", "coordinator: camera-01\n<<: {sites: {}}\n"))
    assert "merge keys (<<) are not allowed" in err.problem and err.key_path == "line 2, column 1"


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("coordinator: camera-01\ncoordinator: pi-north\nsites: {}\n", 2, "coordinator"),
        ("coordinator: camera-01\nsites:\n  pi-north: {}\n  pi-north: {}\n", 4, "pi-north"),
        ("sites: {a: {address: 'h:1', address: 'h:2'}}\n", 1, "address"),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, text, line, key):
    f = write(tmp_path / "dup.yaml", text)
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert info.value.file == str(f)
    assert info.value.key_path.startswith(f"line {line},")
    assert f"duplicate key {key!r}" in info.value.problem


def test_unknown_site_in_a_file(tmp_path):
    f = write(tmp_path / "s.yaml", GOOD_YAML.replace("between: [pi-north, pi-south]", "between: [pi-north, pi-west]"))
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert str(info.value).startswith(f"{f}: links[2].between[1]: unknown site 'pi-west'")


def test_negative_bandwidth_in_a_file(tmp_path):
    f = write(tmp_path / "s.yaml", GOOD_YAML.replace("bandwidth_mbps: 20", "bandwidth_mbps: -20"))
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert str(info.value) == f"{f}: links[0].bandwidth_mbps: expected a positive number, got -20"


def test_negative_gflops_in_a_file(tmp_path):
    f = write(tmp_path / "s.yaml", GOOD_YAML.replace("gflops: 4,", "gflops: -3,"))
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert str(info.value) == f"{f}: sites.pi-north.device.gflops: expected a positive number, got -3"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("- a\n- b\n", "top level", "expected a mapping"),
        ("just a string\n", "top level", "expected a mapping"),
        ("", "top level", "empty document"),
        ("# only a comment\n", "top level", "empty document"),
        ("a: 1\n---\nb: 2\n", "line 2, column 1", "single document"),
        ("a: [1, 2\n", "line 2, column 1", "invalid YAML"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "", "nested too deeply"),
        ("coordinator: camera-01\nsites: {}\nfoo: 1\n", "foo", "unknown key 'foo'"),
    ],
)
def test_malformed_files(tmp_path, text, key, problem):
    f = write(tmp_path / "s.yaml", text)
    with pytest.raises(TopologyError) as info:
        load_topology(f)
    assert info.value.file == str(f)
    assert info.value.key_path == key, str(info.value)
    assert problem in info.value.problem, str(info.value)


def test_missing_directory_binary_and_huge_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = refused(load_topology, missing)
    assert (err.file, err.problem, str(err)) == (str(missing), "file not found", f"{missing}: file not found")
    assert refused(load_topology, tmp_path).problem == "is a directory, expected a YAML file"
    (tmp_path / "bin.yaml").write_bytes(b"a: \xff\xfe\n")
    assert refused(load_topology, tmp_path / "bin.yaml").problem.startswith("not UTF-8")
    write(tmp_path / "big.yaml", "# x\n" * (MAX_FILE_BYTES // 4 + 1))
    assert refused(load_topology, tmp_path / "big.yaml").problem.startswith("file larger than")


def test_yaml_booleans_as_site_names_get_a_hint(tmp_path):
    f = write(tmp_path / "s.yaml", GOOD_YAML.replace("  pi-south:\n", "  no:\n", 1))
    err = refused(load_topology, f)
    assert err.key_path == "sites.False" and "quote it" in err.problem


def test_loader_never_uses_unsafe_yaml_or_environment():
    for name in ("topology.py", "config.py", "files.py"):
        _never_unsafe_yaml_or_environment((ROOT / "deploy" / name).read_text(encoding="utf-8"))


def _never_unsafe_yaml_or_environment(source: str) -> None:
    tree = ast.parse(source)
    banned = {
        ("yaml", "load"),
        ("yaml", "unsafe_load"),
        ("yaml", "full_load"),
        ("yaml", "load_all"),
        ("os", "environ"),
        ("os", "getenv"),
        ("yaml", "UnsafeLoader"),
        ("yaml", "FullLoader"),
    }
    used = {
        (n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    }
    assert not used & banned
    assert "expanduser" not in source


# ---------------------------------------------------------------------------------------------- placement

PLACED = {8: {"camera-01": [0, 1, 2], "pi-north": [3, 4, 5], "pi-south": [5, 6, 7]}}


def test_inline_placement():
    data = base()
    data["placement"] = copy.deepcopy(PLACED)
    topo = parse_topology(data)
    p = topo.placement
    assert topo.placement_source == "inline"
    assert p.sites_for(8, 0) == ("camera-01",)
    assert p.sites_for(8, 5) == ("pi-north", "pi-south")  # replica
    assert p.experts_on("pi-south") == {8: [5, 6, 7]}
    assert p.experts_on("camera-01") == {8: [0, 1, 2]}
    assert p.experts_on("nowhere") == {}
    assert p.layers() == (8,) and p.experts(8) == tuple(range(8))
    assert p.to_yaml_dict() == PLACED
    assert p.fingerprint is None
    with pytest.raises(KeyError, match="expert 9 of layer 8"):
        p.sites_for(8, 9)
    validate_placement(p, topo, {8: 8})
    assert topo.resolve_placement({8: 8}) is p


def test_single_expert_and_string_keys_are_accepted():
    p = parse_placement({"8": {"camera-01": 0, "pi-north": [1]}})
    assert p.to_yaml_dict() == {8: {"camera-01": [0], "pi-north": [1]}}


def test_file_placement_equals_inline(tmp_path):
    (tmp_path / "cfg").mkdir()
    save_placement(Placement({(8, e): ("camera-01",) for e in range(8)}), tmp_path / "cfg" / "other.yaml")
    inline = base()
    inline["placement"] = copy.deepcopy(PLACED)
    out = save_placement(parse_topology(inline).placement, tmp_path / "cfg" / "placement.yaml", fingerprint="sha:1")
    assert out == tmp_path / "cfg" / "placement.yaml"
    assert "fingerprint: sha:1" in out.read_text()
    data = base()
    data["placement"] = "placement.yaml"
    f = write(tmp_path / "cfg" / "sites.yaml", yaml.safe_dump(data))
    topo = load_topology(f)
    assert topo.placement_source == str(out)
    assert topo.placement.assignment == parse_topology(inline).placement.assignment
    assert topo.placement.fingerprint == "sha:1"
    assert topo.model == tmp_path / "cfg" / "m.safetensors"
    # the bare form (no placement:/fingerprint: wrapper) reads the same
    write(
        tmp_path / "cfg" / "placement.yaml",
        "8:\n  camera-01: [0, 1, 2]\n  pi-north: [3, 4, 5]\n  pi-south: [5, 6, 7]\n",
    )
    assert load_topology(f).placement == dataclasses.replace(topo.placement, fingerprint=None)


def test_file_placement_is_resolved_against_the_topology_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    save_placement(parse_placement(PLACED), tmp_path / "cfg" / "placement.yaml")
    data = base()
    data["placement"] = "placement.yaml"
    write(tmp_path / "cfg" / "sites.yaml", yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # a placement.yaml here must not be picked up
    write(tmp_path / "placement.yaml", "8: {camera-01: [0]}\n")
    assert load_topology(Path("cfg") / "sites.yaml").placement.to_yaml_dict() == PLACED


def test_missing_placement_file_is_named(tmp_path):
    data = base()
    data["placement"] = "nope.yaml"
    with pytest.raises(TopologyError) as info:
        parse_topology(data, str(tmp_path / "sites.yaml"))
    assert info.value.key_path == "placement" and str(tmp_path / "nope.yaml") in info.value.problem


def test_bad_placement_file_names_that_file(tmp_path):
    pf = write(tmp_path / "placement.yaml", "fingerprint: x\nplacement:\n  8: {camera-01: [0], pi-west: [1]}\n")
    data = base()
    data["placement"] = "placement.yaml"
    with pytest.raises(TopologyError) as info:
        parse_topology(data, str(tmp_path / "sites.yaml"))
    assert (info.value.file, info.value.key_path) == (str(pf), "placement.8.pi-west")
    assert f"unknown site 'pi-west' (sites in {tmp_path / 'sites.yaml'}: camera-01, pi-north" in info.value.problem
    write(pf, "fingerprint: x\nplacment: {}\n")
    err = refused(parse_topology, data, str(tmp_path / "sites.yaml"))
    assert err.key_path == "placment" and "did you mean 'placement'" in err.problem
    write(pf, "fingerprint: 3\nplacement: {8: {camera-01: [0]}}\n")
    err = refused(load_placement, pf)
    assert (err.key_path, err.problem) == ("fingerprint", "expected a non-empty string, got 3")


def test_save_and_load_placement_round_trip(tmp_path):
    p = Placement({(8, 1): ("b", "a"), (8, 0): "a", (6, 2): ["c"]}, fingerprint="abc")
    path = save_placement(p, tmp_path / "p.yaml")
    back = load_placement(path)
    assert back == p and hash(back) == hash(p)
    assert back.sites_for(8, 1) == ("a", "b")
    assert back.to_yaml_dict() == {6: {"c": [2]}, 8: {"a": [0, 1], "b": [1]}}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    save_placement(p, path, fingerprint="other")
    assert load_placement(path).fingerprint == "other"
    with pytest.raises(ValueError, match="empty site list"):
        Placement({(8, 0): ()})


def test_default_placement_is_round_robin_over_sorted_sites():
    topo = load_topology(EXAMPLE)
    p = default_placement(topo, {8: 16, 6: 4})
    for e in range(16):
        assert p.sites_for(8, e) == (SITES[e % 3],)
    assert p.experts_on("camera-01") == {6: [0, 3], 8: [0, 3, 6, 9, 12, 15]}
    assert p.experts_on("pi-north") == {6: [1], 8: [1, 4, 7, 10, 13]}
    assert p.experts_on("pi-south") == {6: [2], 8: [2, 5, 8, 11, 14]}
    validate_placement(p, topo, {8: 16, 6: 4})  # complete


def test_default_placement_is_deterministic():
    data = base()
    data["sites"] = dict(reversed(list(data["sites"].items())))
    data["coordinator"] = "pi-south"
    data["links"].append({"between": ["pi-south", "pi-north"], "bandwidth_mbps": 1, "latency_ms": 1})
    del data["links"][2]
    a = default_placement(parse_topology(base()), {8: 7})
    b = default_placement(parse_topology(data), {8: 7})
    assert a == b == default_placement(parse_topology(base()), {8: 7})
    assert a.to_yaml_dict() == {8: {"camera-01": [0, 3, 6], "pi-north": [1, 4], "pi-south": [2, 5]}}
    one = dict(base(), sites={"camera-01": base()["sites"]["camera-01"]}, links=[])
    assert default_placement(parse_topology(one), {8: 3}).experts_on("camera-01") == {8: [0, 1, 2]}


@pytest.mark.parametrize("bad", [{}, {8: 0}, {-1: 4}, {8: True}, {"8": 4}])
def test_default_placement_refuses_bad_layer_specs(bad):
    with pytest.raises(ValueError, match="moe_layers"):
        default_placement(parse_topology(base()), bad)


@pytest.mark.parametrize(
    ("assignment", "moe_layers", "key_path", "text"),
    [
        ({(8, 0): ("camera-01",)}, {8: 3}, "placement.8", "expert(s) 1-2 of layer 8 are not placed on any site"),
        (
            {(8, 0): ("camera-01",), (8, 1): ("pi-north",), (8, 3): ("pi-north",)},
            {8: 2},
            "placement.8",
            "expert(s) 3 out of range: layer 8 has 2 experts (0-1)",
        ),
        ({(8, 0): ("camera-01",), (7, 0): ("camera-01",)}, {8: 1}, "placement.7", "layer 7 is not an MoE layer"),
        ({(8, 0): ("pi-west",)}, {8: 1}, "placement.8", "unknown site 'pi-west'"),
        ({(8, 0): ("camera-01",)}, {8: 1, 6: 2}, "placement.6", "expert(s) 0-1 of layer 6 are not placed"),
    ],
)
def test_validate_placement_errors(assignment, moe_layers, key_path, text):
    topo = parse_topology(base(), "field/sites.yaml")
    with pytest.raises(TopologyError) as info:
        validate_placement(Placement(assignment), topo, moe_layers)
    assert (info.value.file, info.value.key_path) == ("field/sites.yaml", key_path), str(info.value)
    assert text in info.value.problem


def test_validate_placement_reports_every_problem_and_names_the_placement_file(tmp_path):
    save_placement(
        Placement({(8, 0): ("camera-01",), (8, 9): ("pi-north",), (5, 0): ("pi-south",)}), tmp_path / "p.yaml"
    )
    data = base()
    data["placement"] = "p.yaml"
    topo = parse_topology(data, str(tmp_path / "sites.yaml"))
    with pytest.raises(TopologyError) as info:
        topo.resolve_placement({8: 4})
    err = info.value
    assert (err.file, err.key_path) == (str(tmp_path / "p.yaml"), "placement")
    assert err.problem.startswith("3 problems:")
    for text in ("layer 5 is not an MoE layer", "expert(s) 9 out of range", "expert(s) 1-3 of layer 8 are not"):
        assert text in err.problem


def test_topology_type_is_exported():
    assert isinstance(load_topology(EXAMPLE), Topology)


def test_relative_model_path_beside_the_file_first_then_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "m.safetensors").write_bytes(b"x")
    doc = ("coordinator: a\nmodel: runs/m.safetensors\nsites:\n  a: {address: 127.0.0.1:5000, device: "
           "{gflops: 1, memory_mb: 10, active_w: 1, idle_w: 1}}\n")
    (tmp_path / "cfg" / "sites.yaml").write_text(doc)
    monkeypatch.chdir(tmp_path)
    assert load_topology(tmp_path / "cfg" / "sites.yaml").model == tmp_path / "runs" / "m.safetensors"
    (tmp_path / "cfg" / "runs").mkdir()
    (tmp_path / "cfg" / "runs" / "m.safetensors").write_bytes(b"y")  # beside the file wins when it exists
    assert load_topology(tmp_path / "cfg" / "sites.yaml").model == tmp_path / "cfg" / "runs" / "m.safetensors"
