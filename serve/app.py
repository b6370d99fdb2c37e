"""The one place the serving deployment is written: prefill units, decode units, the ingress.

`build_app` starts the units (actors/unit.py supervisors, each owning its placement
group) and binds the Ray Serve ingress to them; `run_server` is `epserve serve`: it
starts everything (embedded local Ray and the tiny default model when nothing else is
configured) and shuts down cleanly on SIGTERM or Ctrl-C, leaving no Ray process behind.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time

from epserve.config import Config, ledger_root, load_config
from epserve.model.checkpoint import check_model_dir
from epserve.model.tiny import default_model_dir

log = logging.getLogger("epserve.serve")


@dataclasses.dataclass
class Deployment:
    cfg: Config
    model_dir: str
    prefill_units: list
    decode_units: list
    embedded: object = None
    ledger: object = None
    capacity: object = None
    router: object = None

    def shutdown(self) -> None:
        import ray
        from ray import serve
        try:
            serve.shutdown()
        except Exception:
            pass
        if self.router is not None:
            ray.kill(self.router, no_restart=True)
        live = {"prefill": list(range(len(self.prefill_units))), "decode": list(range(len(self.decode_units)))}
        if self.capacity is not None:
            try:
                reg = ray.get(self.capacity.registry.remote(), timeout=30)
                live = {role: [uid for uid, _, _ in reg[role]] for role in reg}
                ray.get(self.capacity.shutdown.remote(), timeout=60)
            except Exception as exc:
                log.warning("capacity controller shutdown failed: %r", exc)
        if self.ledger is not None:
            try:
                ray.get(self.ledger.append.remote(capacity_rows(self.cfg, live, "stop")), timeout=30)
                ray.get(self.ledger.close.remote(), timeout=30)
                ray.kill(self.ledger, no_restart=True)     # it restarts itself otherwise
            except Exception as exc:
                log.warning("ledger close failed: %r", exc)
        for u in self.prefill_units + self.decode_units:
            try:
                ray.get(u.shutdown.remote(), timeout=30)
                ray.kill(u)
            except Exception:
                pass
        if self.embedded is not None:
            self.embedded.shutdown()


def capacity_rows(cfg: Config, unit_ids: dict[str, list[int]], event: str) -> list:
    from epserve.fleet.ledger import CapacityRow
    now = time.time()
    return [CapacityRow(ts=now, unit=f"{role}-{uid}", role=role, event=event, gpus=getattr(cfg, role).ranks_per_unit)
            for role, ids in unit_ids.items() for uid in ids]


def start_ledger(cfg: Config):
    import ray

    from epserve.actors.ledger import LedgerActor
    from epserve.actors.cluster import control_options
    ledger = LedgerActor.options(**control_options()).remote(ledger_root(cfg), cfg.ledger.flush_rows, cfg.ledger.flush_interval_s)
    ray.get(ledger.start.remote())
    return ledger


def embedded_shape(cfg: Config) -> tuple[int, int]:
    """(nodes, GPUs per node) an embedded Ray needs to host every unit, plus `ray.spare_nodes`
    (a simulated cluster then, even for one-node units: a unit whose node dies rebuilds on a spare)."""
    roles = (cfg.prefill, cfg.decode)
    if all(r.nodes_per_unit == 1 for r in roles) and not cfg.ray.spare_nodes:
        return 1, sum(r.units * r.gpus_per_node for r in roles)
    return (sum(r.units * r.nodes_per_unit for r in roles) + cfg.ray.spare_nodes,
            max(r.gpus_per_node for r in roles))


def start_deployment(cfg: Config) -> Deployment:
    import ray
    from ray import serve

    from epserve.actors.cluster import control_options, ensure_ray
    from epserve.actors.launch import orders, start_units
    from epserve.serve.ingress import Ingress
    model_dir = str(cfg.model or default_model_dir())
    args = check_model_dir(model_dir)
    nodes, gpus = embedded_shape(cfg)
    embedded = ensure_ray(cfg.ray.address, nodes, gpus, cfg.ray.num_cpus)
    try:
        # every unit of both roles starts at once; one that fails is reported, the others serve
        units = start_units(cfg, model_dir, args, orders("prefill", cfg.prefill, "prefill")
                            + orders("decode", cfg.decode, "decode"))
        pre, dec = units["prefill"], units["decode"]
        dep = Deployment(cfg, model_dir, pre, dec, embedded, start_ledger(cfg))
        ray.get(dep.ledger.append.remote(capacity_rows(cfg, {"prefill": list(range(len(pre))),
                                                             "decode": list(range(len(dec)))}, "start")))
        if cfg.autoscale.enabled:
            from epserve.actors.capacity_controller import CapacityController
            dep.capacity = CapacityController.options(**control_options()).remote(cfg, model_dir, args, {"prefill": pre, "decode": dec},
                                                     dep.ledger)
            ray.get(dep.capacity.start.remote())
        from epserve.serve.router import RouterActor
        units = None if dep.capacity is not None else {"prefill": pre, "decode": dec}
        dep.router = RouterActor.options(**control_options()).remote(units, cfg.serve.max_queue, cfg.kv_page_tokens,
                                                                     dep.capacity)
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(Ingress.options(num_replicas=cfg.serve.ingress_replicas,
                                  ray_actor_options={"num_cpus": 0, **control_options()}).bind(
            cfg, model_dir, pre, dec, dep.ledger, dep.capacity, dep.router), name="epserve",
            route_prefix="/", blocking=False)
    except BaseException:
        if embedded is not None:
            embedded.shutdown()
        raise
    log.info("serving %s on http://%s:%d (prefill %d x %d ranks, decode %d x %d ranks)", model_dir, cfg.serve.host,
             cfg.serve.port, cfg.prefill.units, cfg.prefill.ranks_per_unit, cfg.decode.units,
             cfg.decode.ranks_per_unit)
    return dep


def run_server(config: str | None = None, model: str | None = None, host: str | None = None,
               port: int | None = None) -> int:
    cfg = load_config(config)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    cfg = dataclasses.replace(cfg, model=model or cfg.model, serve=dataclasses.replace(cfg.serve, **overrides))
    dep = start_deployment(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):   # after Ray's init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    import ray
    print(f"epserve: serving on http://{cfg.serve.host}:{cfg.serve.port}/v1 (model {cfg.serve.model_name!r}; "
          f"Ray at {ray.get_runtime_context().gcs_address}); Ctrl-C to stop", flush=True)
    try:
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        log.info("shutting down")
        dep.shutdown()
    return 0
