"""The one place the serving application is written: its builder, and `epserve serve` over it.

`build_app(args)` is a Ray Serve application builder, as Ray Serve LLM's `build_openai_app`:
Serve's own tools call it with the args of `serve run epserve.serve.app:build_app k=v ...` (all
strings) or of a Serve config file's `args:` (YAML values), and it returns two deployments: `Units`
(serve/units.py; its one replica starts and owns the prefill and decode units, ledger, router and
capacity controller, and tears them down when Serve stops it) and the `Ingress` (OpenAI routes),
bound to it. So `serve deploy`, `serve status` and `serve shutdown` start, report and end the whole
thing, and nothing of it outlives the application.

Args: `config` (a YAML file, as `epserve serve --config`, or a name in configs/), `model` (a checkpoint folder, as
`--model`), and any config key in dotted form (`decode.units=2`, `dtype=float32`; values are read as
YAML). Where HTTP listens is Serve's (`http_options`), and which Ray is Serve's, so `serve.host`,
`serve.port` and `ray.*` are refused here. In place, without restarting the units: the Ingress's
`num_replicas` and its `user_config` (API keys and tenant limits; serve/tenants.py); changing `args`
makes a new application (Serve rebuilds every deployment).

`run_server` is `epserve serve`: it joins or embeds Ray (embedded local Ray and the tiny default model
when nothing else is configured), `serve.run`s the same application, and on SIGTERM or Ctrl-C deletes
it (the units go with it) and stops what it started, leaving no Ray process behind.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
import time
from pathlib import Path

import yaml

from epserve.config import Config, builtin_config, load_config
from epserve.errors import ConfigError
from epserve.model.checkpoint import check_model_dir
from epserve.model.tiny import default_model_dir

log = logging.getLogger("epserve.serve")

APP_NAME = "epserve"
FILE_ARGS = ("config", "model")
NOT_APP_KEYS = {"serve.host": "Serve's http_options.host", "serve.port": "Serve's http_options.port",
                "ray": "the Ray that runs Serve"}      # under Serve these belong to Serve, not the application


def config_source(config) -> str | None:
    """A config file path, or the name of one shipped in configs/ (`default`, `test`,
    `deepseek_v3_prod`) when no such file exists: a builder on a cluster runs in a worker whose
    working directory the operator does not choose."""
    if config is None or Path(str(config)).is_file():
        return config
    if re.fullmatch(r"\w+", str(config)):
        try:
            return str(builtin_config(str(config)))
        except ConfigError:
            pass
    raise ConfigError(f"application arg 'config': {str(config)!r} is neither a file nor a config in configs/ "
                      f"(default, test, deepseek_v3_prod)")


def config_from_args(args: dict) -> Config:
    """The Config a builder's args give: the `config` file (default: the defaults), `model`, then
    every dotted override. Raises ConfigError naming the first bad arg (Serve shows it as the
    application's status message)."""
    if not isinstance(args, dict):
        raise ConfigError(f"application args: expected a mapping, got {args!r}")
    for key in args:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"application args: {key!r} is not a key")
        for refused, owner in NOT_APP_KEYS.items():
            if key == refused or key.startswith(refused + "."):
                raise ConfigError(f"application arg {key!r}: set by {owner} under Serve, not by the application")
    known = set(FILE_ARGS) | {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in args if k.split(".")[0] not in known)
    if unknown:
        raise ConfigError(f"unknown application arg{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(FILE_ARGS)}, or a config key: {', '.join(sorted(known - set(FILE_ARGS)))})")
    data = load_config(config_source(args.get("config"))).to_dict()
    if args.get("model") is not None:
        data["model"] = str(args["model"])
    for key, value in args.items():
        if key in FILE_ARGS:
            continue
        if isinstance(value, str):      # `serve run ... decode.units=2` passes every value as a string
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"application arg {key!r}: {value!r} is not a YAML value: {exc}") from None
        *path, last = key.split(".")
        node = data
        for i, part in enumerate(path):
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(f"application arg {key!r}: {'.'.join(path[:i + 1])} is not a config section "
                                  f"(args: {', '.join(FILE_ARGS)}, or a config key such as decode.units)")
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**node[last], **value}
        else:
            node[last] = value
    return load_config(data)


def application(cfg: Config):
    """The Serve application for `cfg`: Units, and the Ingress bound to it. The model folder is
    checked here, before anything starts."""
    import ray

    from epserve.actors.cluster import control_options
    from epserve.serve.ingress import Ingress
    from epserve.serve.units import Units
    model_dir = str(cfg.model or default_model_dir())
    check_model_dir(model_dir)
    # `serve run module:builder` builds before it joins Ray; a Serve config file's
    # ray_actor_options can then name the control resource itself (examples/serve_config.yaml)
    ctl = control_options() if ray.is_initialized() else {}
    units = Units.options(ray_actor_options={"num_cpus": 0, **ctl}).bind(cfg, model_dir)
    return Ingress.options(num_replicas=cfg.serve.ingress_replicas, ray_actor_options={"num_cpus": 0, **ctl}
                           ).bind(cfg, model_dir, units=units)


def build_app(args: dict):
    """Ray Serve's application builder: `serve run epserve.serve.app:build_app config=F model=D
    [decode.units=2 ...]` or `import_path: epserve.serve.app:build_app` with `args:`."""
    return application(config_from_args(args))


@dataclasses.dataclass
class Deployment:
    """What `start_deployment` started: the config, and the handles the application's Units replica
    owns (for tests and tools on the driver)."""

    cfg: Config
    model_dir: str
    prefill_units: list
    decode_units: list
    embedded: object = None
    ledger: object = None
    capacity: object = None
    router: object = None

    def shutdown(self) -> None:
        """Delete the application (its Units replica tears the units down, serve/units.py), stop
        Serve, then the Ray this started, if any."""
        from ray import serve
        try:
            serve.delete(APP_NAME, _blocking=True)
            serve.shutdown()
        except Exception as exc:
            log.warning("serve shutdown failed: %r", exc)
        if self.embedded is not None:
            self.embedded.shutdown()


def embedded_shape(cfg: Config) -> tuple[int, int]:
    """(nodes, GPUs per node) an embedded Ray needs to host every unit, plus `ray.spare_nodes`
    (a simulated cluster then, even for one-node units: a unit whose node dies rebuilds on a spare)."""
    roles = (cfg.prefill, cfg.decode)
    if all(r.nodes_per_unit == 1 for r in roles) and not cfg.ray.spare_nodes:
        return 1, sum(r.units * r.gpus_per_node for r in roles)
    return (sum(r.units * r.nodes_per_unit for r in roles) + cfg.ray.spare_nodes,
            max(r.gpus_per_node for r in roles))


def start_deployment(cfg: Config) -> Deployment:
    """Join or embed Ray, start Serve's HTTP on serve.host:serve.port and run the application; returns
    once it is up (every unit started)."""
    from ray import serve

    from epserve.actors.cluster import ensure_ray
    model_dir = str(cfg.model or default_model_dir())
    check_model_dir(model_dir)
    nodes, gpus = embedded_shape(cfg)
    embedded = ensure_ray(cfg.ray.address, nodes, gpus, cfg.ray.num_cpus)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(application(dataclasses.replace(cfg, model=model_dir)), name=APP_NAME, route_prefix="/")
        parts = serve.get_deployment_handle("Units", APP_NAME).parts.remote().result()
    except BaseException:
        if embedded is not None:
            embedded.shutdown()
        raise
    log.info("serving %s on http://%s:%d (prefill %d x %d ranks, decode %d x %d ranks)", model_dir, cfg.serve.host,
             cfg.serve.port, cfg.prefill.units, cfg.prefill.ranks_per_unit, cfg.decode.units,
             cfg.decode.ranks_per_unit)
    return Deployment(cfg, model_dir, parts["prefill"], parts["decode"], embedded, parts["ledger"],
                      parts["capacity"], parts["router"])


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
