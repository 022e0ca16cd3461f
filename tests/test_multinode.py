"""Several Ray nodes: simulated on this machine with Ray's own ``cluster_utils.Cluster`` (each node a raylet of its
own, with 2 CPUs: room for one TP=2 group), and a cluster started with ``ray start`` that ``--address`` joins.

Each TP group lands whole on one node (STRICT_PACK), groups run on both nodes at once, and a node lost mid-sweep
leaves its config recorded ``failed`` while the rest finish; ``--resume`` then runs what it lost."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from fusiontune.harness.launcher import run_plan
from fusiontune.harness.results import RunFolder, completed_configs
from fusiontune.harness.sweep import expand, parse_sweep
from fusiontune.harness.process_group import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time: tests/conftest.py
SWEEP = """
name: nodes
model: {preset: tiny, quant: fp8-static, num_layers: 1, max_position: 4096}
tp: [2]
num_tokens: [2, 16]
optimization_level: 0
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}
measure: {warmup: 1, repeats: 5, max_repeats: 5, profile: false, paired: false}  # a job per config
cluster: {groups: 2}
"""
NODE = re.compile(r"rank (\d): job .*; node (\w+)")


def _nodes_by_config(folder: RunFolder) -> dict[str, set[str]]:
    """Per config log: the nodes its ranks ran on."""
    placed = {}
    for log in (folder.path / "logs").iterdir():
        placed[log.name] = {node for _, node in NODE.findall(log.read_text())}
    return placed


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node: no workers
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_groups_land_whole_on_one_node_and_run_on_both(two_nodes, tmp_path):
    folder = RunFolder(tmp_path / "run")
    plan = expand(parse_sweep(SWEEP))
    run_plan(plan, folder, config_timeout_s=300)
    table = folder.table()
    assert (table["status"] == "ok").all(), table[["label", "status", "error"]]
    placed = _nodes_by_config(folder)
    assert len(placed) == len(plan.configs) and all(len(nodes) == 1 for nodes in placed.values()), placed
    assert len(set().union(*placed.values())) == 2  # the two groups ran on the two nodes
    assert '"groups": {\n    "2": 2' in folder.manifest_path.read_text()


def test_a_node_lost_mid_sweep_fails_its_config_and_the_rest_finish(two_nodes, tmp_path):
    cluster, nodes = two_nodes
    folder = RunFolder(tmp_path / "run")
    plan = expand(parse_sweep(SWEEP))

    def lose_a_node(config, rows):
        if config.is_baseline and nodes[1] in cluster.worker_nodes:
            time.sleep(2)  # the second group is at work on the next config
            cluster.remove_node(nodes[1])

    run_plan(plan, folder, config_timeout_s=300, on_config=lose_a_node)
    table = folder.table()
    assert set(table["status"]) <= {"ok", "failed"} and len(table) == len(plan.configs) * 2
    failed = table[table["status"] == "failed"]
    assert (table["status"] == "ok").sum() >= 2 * 2, table[["label", "status", "error"]]  # baseline and more
    assert failed["error"].str.contains("died|Died|lost|unavailable|timed out", regex=True).all(), failed["error"]
    # a resume on the node that is left runs what the lost node took with it
    done = completed_configs(folder.rows(), plan.spec.num_tokens)
    rest = plan.without(done)
    run_plan(rest, folder, config_timeout_s=300)
    assert (folder.table()["status"] == "ok").all()


def test_address_joins_a_cluster_started_with_ray_start(tmp_path):
    """``ray start --head`` as a user runs it (here bound to 127.0.0.1, 2 CPUs), then ``--address auto``. It ends
    with ``ray stop``, which stops every Ray on the machine: run it where no other Ray is at work."""
    port = free_port()
    start = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=180)
    try:
        sweep = tmp_path / "s.yaml"
        sweep.write_text(SWEEP.replace("pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}",
                                       "pass_config: {fuse_norm_quant: [false, true]}"))
        result = subprocess.run(["fusiontune", "run", str(sweep), "--out", str(tmp_path / "run"), "--no-report",
                                 "--address", "auto"], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["cluster_address"] == "auto" and manifest["cluster_resources"]["CPU"] == 2.0  # ray start's
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
