"""surge: a server for local LLMs that keeps working when many people use it at once."""

from surge.config import EngineConfig
from surge.engine.outputs import CompletionOutput, RequestOutput
from surge.engine.request import InvalidRequestError, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LLM pulls in torch and the models; load it only when asked for
    if name == "LLM":
        from surge.llm import LLM

        return LLM
    raise AttributeError(name)
