"""Offline generation on EP units: `python examples/offline_generate.py [CHECKPOINT]`.

With no checkpoint, the tiny default model is made on first use; Ray is embedded unless one is
initialised (or `ray.address` is set in the config)."""
import sys

import epserve

model = sys.argv[1] if len(sys.argv) > 1 else None
with epserve.LLM(model=model, config={"decode": {"gpus_per_node": 2, "redundant_experts": 0}}) as llm:
    outs = llm.generate(["Hello, world!", "The sea is"], epserve.SamplingParams(max_tokens=16, temperature=0.0))
    for o in outs:
        print(repr(o.text), o.usage.to_dict())
