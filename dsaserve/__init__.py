"""dsaserve: long-context prefill for DeepSeek-V3.2-class (DSA) models with pipeline x context parallelism."""

from dsaserve.engine.types import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in the model stack; import it lazily so `import dsaserve` stays cheap for the CLI.
    if name == "LLM":
        from dsaserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
