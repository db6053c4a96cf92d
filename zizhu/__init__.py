"""zizhu: an inference and serving engine for the DeepSeek model family, on any hardware."""

from zizhu.llm import LLM
from zizhu.outputs import CompletionOutput, Logprob, RequestOutput
from zizhu.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
