"""epserve: serve DeepSeek-V3/R1-class MoE models on Ray the way DeepSeek serves them.

Public surface: LLM, SamplingParams, load_config. LLM is imported lazily so that
`import epserve` stays light (no Ray, no torch.distributed) for the pure modules.
"""
import os

# Ray reads this once, when it is first imported: with it off, an embedded or simulated cluster
# on 127.0.0.1 stays on loopback (ray.init would otherwise resolve 127.0.0.1 to the machine's
# external address and wait for a GCS that is not there). Set before any epserve module imports Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from epserve.config import Config, load_config  # noqa: E402
from epserve.model.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "load_config", "Config"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":
        from epserve.llm import LLM
        return LLM
    raise AttributeError(f"module 'epserve' has no attribute {name!r}")
