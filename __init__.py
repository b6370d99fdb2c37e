"""epserve: serve DeepSeek-V3/R1-class MoE models on Ray the way DeepSeek serves them.

Public surface: LLM, SamplingParams, load_config. LLM is imported lazily so that
`import epserve` stays light (no Ray, no torch.distributed) for the pure modules.
"""
from epserve.config import Config, load_config
from epserve.model.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "load_config", "Config"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":
        from epserve.llm import LLM
        return LLM
    raise AttributeError(f"module 'epserve' has no attribute {name!r}")
