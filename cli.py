"""`epserve`: one entry point. Errors are one readable line on stderr and a non-zero exit: the
error family's exit code (epserve.errors: 2 a bad request or argument, 3 configuration, 4
unavailable, 5 a unit failed, 6 overloaded), 1 for any other error a command reports."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from epserve.bench.args import add_parser as add_bench_parser
from epserve.errors import EpserveError, InvalidRequest, cli_error

EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epserve", description="Serve DeepSeek-V3/R1-class MoE models on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start the OpenAI-compatible server (embedded Ray + tiny model by default)")
    s.add_argument("--config", help="YAML config file (default: the embedded default)")
    s.add_argument("--model", help="checkpoint folder (overrides the config's model)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)

    g = sub.add_parser("generate", help="offline generation on EP units")
    g.add_argument("prompts", nargs="*", help="text prompts")
    g.add_argument("--token-ids", action="append", default=[], help="a prompt as comma-separated token ids")
    g.add_argument("--config")
    g.add_argument("--model")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    m = sub.add_parser("make-tiny-model", help="write a random-weight DeepSeek-V3-layout checkpoint")
    m.add_argument("dir")
    m.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 weight_scale_inv")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("--chat-template", default="v3", choices=["v3", "r1", "v3.1", "r1-0528"],
                   help="DeepSeek-V3's chat template (tool calls), the R1 variant that opens <think>, V3.1's "
                        "(thinking switch) or R1-0528's; a family preset brings its own")
    m.add_argument("--preset", default="tiny", help="tiny (default) | v31-tiny | r1-0528-tiny | kimi-k2-tiny "
                   "| v32-tiny (DeepSeek-V3.2: sparse attention) | v32-ep144-rank | v32-ep32-rank "
                   "| v3-4l | v3-ep144-rank | v3-ep144-rank-61l | v3-ep32-rank | v3-mini "
                   "(V3-width ones are FP8, ~5-40 GB; make them on a GPU with --device cuda)")
    m.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is much faster)")

    t = sub.add_parser("train-tiny", help="train a tiny DeepSeek-V3 with its MTP module on CPU (minutes), saved in "
                       "the release layout")
    t.add_argument("dir")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the same bytes on every run)")

    pl = sub.add_parser("plan", help="print a config's unit placement without the hardware")
    pl.add_argument("config", help="YAML config (e.g. configs/deepseek_v3_prod.yaml)")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--shape", default=None, help="the model's dimensions when the config's `model` folder is not "
                    "here: deepseek-v3 (default) | kimi-k2")

    e = sub.add_parser("eplb", help="run EPLB offline on a saved load matrix [layers, experts]")
    e.add_argument("--stats", required=True, help=".npy, .pt or .csv load matrix")
    e.add_argument("--config", help="config giving the unit shape (default: production prefill)")
    e.add_argument("--role", choices=["prefill", "decode"], default="prefill")
    e.add_argument("--groups", type=int, default=8)
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("report", help="the seed's daily statistics table from a ledger")
    r.add_argument("--ledger", required=True)
    r.add_argument("--from", dest="start")
    r.add_argument("--to", dest="end")
    r.add_argument("--config", help="config with pricing")
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", help="write a PNG of node count and tokens/s")
    r.add_argument("--skip-bad-parts", action="store_true",
                   help="exit 0 even if some ledger parts or rows could not be read (they are still listed)")

    sm = sub.add_parser("simulate", help="24 h of a fleet on the live balancer, EPLB and capacity code")
    sm.add_argument("--scenario", default=None, help="deepseek-day (default when no --trace)")
    sm.add_argument("--trace", help="CSV or JSONL trace: ts_s, prompt_tokens, cached_tokens, output_tokens")
    sm.add_argument("--json", action="store_true")
    sm.add_argument("--plot", help="write a PNG of node count and tokens/s")
    sm.add_argument("--step-s", type=float, default=60.0)
    sm.add_argument("--rank-failures", type=int, default=0,
                    help="decode-rank deaths over the run: elastic EP's stall against today's rebuild")

    add_bench_parser(sub)
    return p


def _cmd_make_tiny_model(a) -> int:
    from epserve.model.tiny import make_tiny_model
    out = make_tiny_model(a.dir, fp8=a.fp8, seed=a.seed, shards=a.shards, preset=a.preset, device=a.device,
                          chat_template=a.chat_template)
    print(f"wrote {'FP8 ' if a.fp8 or a.preset.startswith('v3-') else ''}{a.preset} DeepSeek-V3-layout checkpoint "
          f"to {out}")
    return 0


def _cmd_train_tiny(a) -> int:
    import torch

    from epserve.model.train_tiny import TrainSpec, train
    torch.set_num_threads(a.threads)
    out = train(a.dir, TrainSpec(steps=a.steps, seed=a.seed), log=lambda line: print(line, file=sys.stderr))
    print(f"wrote the trained tiny DeepSeek-V3 (+ MTP) to {a.dir}: {out['steps']} steps in {out['seconds']} s, "
          f"loss {out['history'][-1]['loss']}, MTP loss {out['history'][-1]['mtp_loss']}")
    return 0


def _cmd_generate(a) -> int:
    import epserve
    prompts = list(a.prompts)
    for ids in a.token_ids:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise InvalidRequest(f"--token-ids: {ids!r} is not a comma-separated id list", "--token-ids") from None
    if not prompts:
        raise InvalidRequest("give at least one prompt (text, or --token-ids 1,2,3)", "prompts")
    params = epserve.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                    top_k=a.top_k, seed=a.seed, stop=tuple(a.stop), ignore_eos=a.ignore_eos)
    with epserve.LLM(model=a.model, config=a.config) as llm:
        outs = llm.generate(prompts, params)
    for o in outs:
        if a.json:
            print(json.dumps({"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                              "usage": o.usage.to_dict()}))
        else:
            print(o.text if o.text is not None else o.token_ids)
    return 0


def _cmd_plan(a) -> int:
    from epserve.config import load_config
    from epserve.plan import format_plan, plan_units
    cfg = load_config(a.config)
    plan = plan_units(cfg, a.shape)
    print(json.dumps(plan, indent=1) if a.json else format_plan(plan))
    return 0


def _cmd_eplb(a) -> int:
    from epserve.config import load_config
    from epserve.fleet.eplb_stats import eplb_table, format_table, load_stats
    weight = load_stats(a.stats)
    if a.config:
        u = getattr(load_config(a.config), a.role)
        nodes, gpus, red = u.nodes_per_unit, u.nodes_per_unit * u.gpus_per_node, u.redundant_experts
    else:
        nodes, gpus, red = (4, 32, 32) if a.role == "prefill" else (18, 144, 32)
    table = eplb_table(weight, weight.shape[1] + red, a.groups, nodes, gpus)
    print(json.dumps(table, indent=1) if a.json else format_table(table))
    return 0


def _cmd_report(a) -> int:
    from datetime import datetime, timezone

    from epserve.config import load_config
    from epserve.fleet.ledger_read import read_ledger
    from epserve.fleet.report import build_report, format_report, plot_report

    def when(s):
        if s is None:
            return None
        try:
            t = datetime.fromisoformat(s)
        except ValueError:
            raise InvalidRequest(f"--from/--to: {s!r} is not an ISO time like 2025-02-27T12:00", "--from") from None
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)

    pricing = load_config(a.config).pricing
    start, end = when(a.start), when(a.end)
    led = read_ledger(a.ledger, start, end)
    rep = build_report(led.requests, led.capacity, pricing, start, end, a.gpus_per_node)
    if a.json:
        print(json.dumps({**rep.to_dict(), "ledger": led.to_dict()}, indent=1))
    else:
        print(format_report(rep) + "\n" + led.format())
    if a.plot:
        plot_report(led.requests, led.capacity, a.plot, a.gpus_per_node, pricing=pricing, start=start, end=end)
    if not led.is_complete and not a.skip_bad_parts:
        first = led.lost_parts[0].path if led.lost_parts else "rows with nulls"
        print(f"epserve report: error: the figures leave out {len(led.lost_parts)} unreadable ledger part(s) and "
              f"{led.skipped_rows:,} row(s) (first: {first}); repair or move them, or pass --skip-bad-parts",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


def _cmd_simulate(a) -> int:
    from epserve.fleet.simulate_cli import run_simulate
    if a.scenario and a.trace:
        raise InvalidRequest("give --scenario or --trace, not both", "--scenario")
    if a.rank_failures < 0:
        raise InvalidRequest(f"--rank-failures must be >= 0, got {a.rank_failures}", "--rank-failures")
    print(run_simulate(a.scenario or (None if a.trace else "deepseek-day"), a.trace, a.json, a.plot,
                       step_s=a.step_s, rank_failures=a.rank_failures))
    return 0


def _cmd_bench(a) -> int:
    from epserve import bench
    print(json.dumps(bench.run(a), indent=1))
    return 0


def _cmd_serve(a) -> int:
    from epserve.serve.app import run_server
    return run_server(a.config, model=a.model, host=a.host, port=a.port)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = globals()[f"_cmd_{args.cmd.replace('-', '_')}"]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (EpserveError, ValueError, RuntimeError, OSError) as exc:   # the family, and builtins a command raised
        if args.verbose:
            raise
        line, code = cli_error(exc, f"bench {args.what}" if args.cmd == "bench" else args.cmd)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
