"""Joining Ray: the cluster that is initialised, or an embedded one on loopback.

Embedded Ray on a machine without CUDA advertises fake GPUs (logical resources);
units that span several nodes get a simulated multi-node cluster
(ray.cluster_utils.Cluster) so the same placement code runs as on real hardware.
Only what this module started is shut down by it.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("epserve.cluster")

MB = 1 << 20
CONTROL = "epserve_control"     # a resource only the control plane's node offers (see control_options)


def control_options() -> dict:
    """Ray options for a control-plane actor (unit supervisor, EPLB and capacity controllers, ledger,
    router, ingress replica): where the cluster offers the `epserve_control` resource, there.

    An embedded Ray puts it on its head node (no GPUs), so losing a GPU node kills ranks, which
    their supervisor rebuilds, and never the supervisor itself (one that died took its unit with
    it: every request then failed). On a cluster of your own, start the CPU node that should hold
    the control plane with `ray start --resources '{"epserve_control": 10000}'`; without it Ray
    places these actors where it likes."""
    import ray
    return {"resources": {CONTROL: 0.001}} if ray.cluster_resources().get(CONTROL) else {}


class EmbeddedRay:
    """Handle on a Ray this process started; `shutdown()` ends only that."""

    def __init__(self, cluster=None):
        self.cluster = cluster

    def shutdown(self) -> None:
        import ray
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


def ensure_ray(address: str | None, nodes: int, gpus_per_node: int, num_cpus: int | None = None
               ) -> EmbeddedRay | None:
    """Join `address` (or an already initialised Ray); else start an embedded one. None if joined."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address, log_to_driver=False)
        log.info("joined Ray at %s", address)
        return None
    cpus = num_cpus or max(2, os.cpu_count() or 2)
    if nodes <= 1:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus_per_node, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 * MB, _node_ip_address="127.0.0.1", resources={CONTROL: 10000})
        log.info("started embedded Ray: 1 node, %d (fake) GPUs", gpus_per_node)
        return EmbeddedRay()
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, node_ip_address="127.0.0.1", object_store_memory=80 * MB,
        resources={CONTROL: 10000}))
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus, num_gpus=gpus_per_node, node_ip_address="127.0.0.1",
                         object_store_memory=80 * MB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")   # loopback only
    log.info("started embedded simulated cluster: %d nodes x %d (fake) GPUs", nodes, gpus_per_node)
    return EmbeddedRay(cluster)
