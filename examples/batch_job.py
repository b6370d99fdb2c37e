"""A batch job for `ray job submit` (from a notebook or a shell):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python examples/batch_job.py prompts.txt

Inside a job Ray is already initialised, so epserve.LLM runs its units on that cluster.
Reads one prompt per line, writes JSON lines with text and usage to stdout."""
import json
import sys

import epserve
from tqdm import tqdm

prompts = [line.rstrip("\n") for line in open(sys.argv[1]) if line.strip()]
with epserve.LLM(config={"ray": {"address": "auto"}}) as llm:
    for i in tqdm(range(0, len(prompts), 64), desc="batches"):
        for o in llm.generate(prompts[i:i + 64], epserve.SamplingParams(max_tokens=64, temperature=0.0)):
            print(json.dumps({"text": o.text, "usage": o.usage.to_dict()}))
