"""Two server types on one machine: a ray.cluster_utils.Cluster with an A800 node and an RTX 3090 node."""

import pytest

from raytune_it.config import load_config
from raytune_it.hardware import SERVER_TYPES
from raytune_it.train.driver import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_type_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        name: cluster.add_node(num_cpus=2, resources={SERVER_TYPES[name].resource: 2})
        for name in ("a800-80g", "rtx3090-24g")
    }
    ray.init(address=cluster.address)
    yield nodes
    ray.shutdown()
    cluster.shutdown()


def test_job_lands_on_the_server_type_it_asked_for(two_type_cluster, tmp_path):
    import ray

    resources = ray.cluster_resources()
    assert resources[SERVER_TYPES["a800-80g"].resource] == 2 and resources[SERVER_TYPES["rtx3090-24g"].resource] == 2
    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "scaling.server_type=rtx3090-24g",
                                       "scaling.num_workers=2", "train.max_steps=2", "train.eval_every_steps=2"])
    summary = train(config)
    rtx_node = two_type_cluster["rtx3090-24g"].node_id
    assert summary.worker_nodes == [rtx_node, rtx_node]
    assert summary.server_type == "rtx3090-24g"

