"""A throw-away RabbitMQ cluster of `BrokerNode`s for the integration tests.

    cluster = Cluster(2)            # two nodes, not started yet
    cluster.start()                 # boots them side by side, joins node 2.. to node 1
    a, b = cluster.nodes            # BrokerNode each: .url, .nodename, .ctl(), .stop(), .start()
    cluster.running_nodes()         # what node 1 sees as running members
    cluster.close()                 # stops every node, deletes their dirs

Once per test module (the nodes are the expensive part; see the README for
what they cost):

    class MyTest(RouterTestCase):
        @classmethod
        def setUpClass(cls):
            super().setUpClass()
            cls.cluster = Cluster.for_class(cls, 2)    # started; closed by a class cleanup

The nodes join with `rabbitmqctl -n NODE stop_app / join_cluster FIRST /
start_app`. A member that is stopped (`node.stop()`) and started again
(`node.start()`) comes back as a member: its data dir is kept. Stop and start
members, never node 1 last and alone: RabbitMQ wants the last node that stopped
to be the first to start again (close() stops them in reverse order).

Like BrokerNode, it needs root (or the rabbitmq user); a test module without
it is skipped.
"""
import time
from typing import List

from broker_node import BrokerNode


class Cluster:
    def __init__(self, size: int = 3, **node_kwargs):
        if size < 2:
            raise ValueError("a cluster has at least 2 nodes")
        self.nodes: List[BrokerNode] = [BrokerNode(**node_kwargs) for _ in range(size)]
        self.started_in = 0.0  # seconds the last start() took (boot + join)

    @classmethod
    def for_class(cls, test_class, size: int = 3, **node_kwargs) -> "Cluster":
        """A started cluster for a whole test class, closed by a class cleanup."""
        cluster = cls(size, **node_kwargs)
        test_class.addClassCleanup(cluster.close)
        cluster.start()
        return cluster

    @property
    def first(self) -> BrokerNode:
        return self.nodes[0]

    def start(self, timeout: float = 120.0) -> "Cluster":
        t0 = time.monotonic()
        for n in self.nodes:  # boot side by side
            n.launch()
        for n in self.nodes:
            n.wait_ready(timeout)
        for n in self.nodes[1:]:
            n.ctl("stop_app")
            n.ctl("join_cluster", self.first.nodename)
            n.ctl("start_app")
            n.wait_ready(timeout)
        self.wait_members(len(self.nodes), timeout)
        self.started_in = time.monotonic() - t0
        return self

    def running_nodes(self, via: BrokerNode = None) -> List[str]:
        """Node names the cluster reports as running (asked of `via`, default
        the first running node)."""
        via = via or next(n for n in self.nodes if n.running())
        status = via.ctl_json("cluster_status")
        if isinstance(status, dict):
            return sorted(status.get("running_nodes", []))
        return []

    def wait_members(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                running = self.running_nodes()
            except (RuntimeError, StopIteration, ValueError):
                running = []
            if len(running) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster: %d running node(s), wanted %d: %s" % (len(running), count, running))
            time.sleep(0.5)

    def close(self) -> None:
        for n in reversed(self.nodes):
            try:
                n.close()
            except Exception:
                n.kill()
