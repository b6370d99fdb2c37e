"""A batch job for `ray job submit`: prompts in (one per line), a Parquet file out (one row per prompt).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python examples/batch_job.py prompts.txt /abs/out.parquet [--model DIR] [--config FILE] [--max-tokens N]

A job's driver finds its cluster through RAY_ADDRESS (the job server sets it), so the config's
`ray.address` defaults to `auto` here and epserve.LLM's units run on the cluster the job was
submitted to; the cluster must offer the GPUs (real or logical) the config's `decode` units ask for.
Greedy decoding (temperature 0). Rows: prompt, text, token_ids, the usage fields
(prompt_tokens, completion_tokens, total_tokens, prompt_cache_hit_tokens, prompt_cache_miss_tokens)
and finish_reason. Relative paths are the job's working directory's, which is a copy: give OUT
absolute. The file appears only when every prompt is done (written to OUT.tmp, then renamed). A bad
argument or input is one line on stderr and a non-zero exit (epserve's CLI codes: 2 bad input,
3 config or checkpoint, ...)."""
import argparse
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import epserve
from epserve.errors import EpserveError, InvalidRequest, cli_error

SCHEMA = pa.schema([("prompt", pa.string()), ("text", pa.string()), ("token_ids", pa.list_(pa.int32())),
                    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
                    ("prompt_cache_hit_tokens", pa.int64()), ("prompt_cache_miss_tokens", pa.int64()),
                    ("finish_reason", pa.string())])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="batch_job.py", description=__doc__.splitlines()[0])
    p.add_argument("prompts", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("out", help="Parquet file to write")
    p.add_argument("--model", help="checkpoint directory (default: the config's model)")
    p.add_argument("--config", help="epserve YAML config (default: the embedded default)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call (default 64)")
    return p.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of `path`, newline stripped; InvalidRequest if it is missing or has none."""
    if not os.path.isfile(path):
        raise InvalidRequest(f"prompts file {path!r} does not exist", "prompts")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise InvalidRequest(f"prompts file {path!r} has no prompts (one per line)", "prompts")
    return prompts


def run(args) -> int:
    """Generate for every prompt and write the Parquet file; -> the number of rows written."""
    if args.max_tokens < 1:
        raise InvalidRequest(f"--max-tokens must be >= 1, got {args.max_tokens}", "max_tokens")
    if args.batch < 1:
        raise InvalidRequest(f"--batch must be >= 1, got {args.batch}", "batch")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise InvalidRequest(f"output directory {out_dir!r} does not exist", "out")
    prompts = read_prompts(args.prompts)
    cfg = epserve.load_config(args.config)
    ray_section = {**cfg.to_dict()["ray"], "address": cfg.ray.address or "auto"}   # join the job's cluster
    cfg = epserve.load_config(cfg, ray=ray_section)
    params = epserve.SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rows = {name: [] for name in SCHEMA.names}
    with epserve.LLM(model=args.model, config=cfg) as llm:
        for i in tqdm(range(0, len(prompts), args.batch), desc="batches", file=sys.stderr):
            batch = prompts[i:i + args.batch]
            for prompt, o in zip(batch, llm.generate(batch, params)):
                u = o.usage
                for name, value in (("prompt", prompt), ("text", o.text), ("token_ids", o.token_ids),
                                    ("prompt_tokens", u.prompt_tokens), ("completion_tokens", u.completion_tokens),
                                    ("total_tokens", u.total_tokens),
                                    ("prompt_cache_hit_tokens", u.prompt_cache_hit_tokens),
                                    ("prompt_cache_miss_tokens", u.prompt_cache_miss_tokens),
                                    ("finish_reason", o.finish_reason)):
                    rows[name].append(value)
    tmp = args.out + ".tmp"
    pq.write_table(pa.table(rows, schema=SCHEMA), tmp)
    os.replace(tmp, args.out)          # readers never see a half-written file
    return len(prompts)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        n = run(args)
    except EpserveError as exc:
        line, code = cli_error(exc, "batch_job")
        print(line, file=sys.stderr)
        return code
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
