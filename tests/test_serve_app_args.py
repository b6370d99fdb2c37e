"""The Serve application builder's arguments, without Ray: what `serve run ... k=v` and a Serve config's
`args:` turn into, what they refuse and how; the in-place user_config; the example Serve config and
KubeRay manifest parse as Serve configs whose args the builder accepts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from epserve.config import ServeConfig, TenantConfig, load_config
from epserve.errors import ConfigError
from epserve.serve.app import build_app, config_from_args
from epserve.serve.tenants import TenantTable, live_serve_config

REPO = Path(__file__).resolve().parent.parent
IMPORT_PATH = "epserve.serve.app:build_app"


def test_string_args_from_serve_run_override_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dtype: float32\ndecode: {units: 1, kv_pages: 32}\n")
    cfg = config_from_args({"config": str(f), "model": "/m", "decode.units": "3", "serve.max_queue": "7",
                            "serve.tenants": "[{name: a, api_keys: [k], max_concurrent: 2}]"})
    assert (cfg.dtype, cfg.model, cfg.decode.units, cfg.decode.kv_pages) == ("float32", "/m", 3, 32)
    assert cfg.serve.max_queue == 7
    assert cfg.serve.tenants == (TenantConfig("a", ("k",), 0.0, 2),)


def test_yaml_section_args_merge_into_the_section():
    cfg = config_from_args({"config": "test", "prefill": {"kv_pages": 16}})
    base = load_config(REPO / "configs" / "test.yaml")
    assert cfg.prefill.kv_pages == 16
    assert cfg.prefill.units == base.prefill.units          # the rest of the section is the file's


@pytest.mark.parametrize("args, names", [
    ({"bogus": "1", "zz.y": "2"}, ["unknown application args 'bogus', 'zz.y'", "known: config, model"]),
    ({"decode.bogus": "1"}, ["decode.bogus: unknown key"]),
    ({"dtype.x": "1"}, ["'dtype.x'", "dtype is not a config section"]),
    ({"decode.units": "many"}, ["decode.units: expected an integer, got 'many'"]),
    ({"serve.port": "9000"}, ["'serve.port'", "http_options.port"]),
    ({"serve.host": "0.0.0.0"}, ["'serve.host'", "http_options.host"]),
    ({"ray.address": "auto"}, ["'ray.address'", "the Ray that runs Serve"]),
    ({"config": "no/such.yaml"}, ["'no/such.yaml' is neither a file nor a config in configs/"]),
])
def test_bad_args_raise_config_error_naming_them(args, names):
    with pytest.raises(ConfigError) as err:
        config_from_args(args)
    for name in names:
        assert name in str(err.value)


def test_builder_refuses_a_model_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match=str(tmp_path)):
        build_app({"model": str(tmp_path)})


def test_user_config_replaces_only_keys_and_tenants():
    base = ServeConfig(api_keys=("old",), max_queue=9)
    live = live_serve_config(base, {"tenants": [{"name": "acme", "api_keys": ["k"], "max_requests_per_s": 0.5}]})
    assert live.api_keys == ("old",) and live.max_queue == 9
    assert live.tenants == (TenantConfig("acme", ("k",), 0.5, 0),)
    table = TenantTable(live)
    assert table.resolve("Bearer k").limits.max_requests_per_s == 0.5
    assert live_serve_config(base, None) == base


@pytest.mark.parametrize("user_config, name", [
    ({"max_queue": 3}, "user_config.max_queue: cannot change in place"),
    ({"tenants": [{"name": "a b", "api_keys": ["k"]}]}, "serve.tenants[0].name"),
    ({"api_keys": [""]}, "serve.api_keys"),
    (["tenants"], "user_config: expected a mapping"),
])
def test_bad_user_config_raises_naming_the_key(user_config, name):
    with pytest.raises(ConfigError, match=name.replace("[", r"\[").replace("]", r"\]")):
        live_serve_config(ServeConfig(), user_config)


def _app(conf: dict) -> dict:
    schema = ServeDeploySchema.model_validate(conf)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert {d.name for d in app.deployments} == {"Units", "Ingress"}
    return app


def test_example_serve_config_is_a_serve_config_the_builder_accepts():
    app = _app(yaml.safe_load((REPO / "examples" / "serve_config.yaml").read_text()))
    cfg = config_from_args(app.args)
    assert cfg == load_config(REPO / "configs" / "default.yaml")


def test_rayservice_serve_config_v2_is_a_serve_config_the_builder_accepts():
    manifest = yaml.safe_load((REPO / "examples" / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    app = _app(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    cfg = config_from_args(app.args)
    assert cfg.decode.nodes_per_unit == 18 and cfg.prefill.nodes_per_unit == 4
    for d in app.deployments:                 # the control plane on the head, by the control resource
        assert d.ray_actor_options.resources == {"epserve_control": 0.001}
    ingress = next(d for d in app.deployments if d.name == "Ingress")
    assert live_serve_config(cfg.serve, ingress.user_config).tenants[0].name == "acme"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert "epserve_control" in cluster["headGroupSpec"]["rayStartParams"]["resources"]
    (gpus,) = cluster["workerGroupSpecs"]
    assert int(gpus["rayStartParams"]["num-gpus"]) == cfg.decode.gpus_per_node == cfg.prefill.gpus_per_node
    limits = gpus["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == cfg.decode.gpus_per_node
    peak = cfg.prefill.units * cfg.prefill.nodes_per_unit + cfg.decode.units * cfg.decode.nodes_per_unit
    assert gpus["maxReplicas"] == peak
