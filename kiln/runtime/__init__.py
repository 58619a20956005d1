"""Runtime: load an artifact with the TVM runtime alone, own the KV cache, run and sample.

Never imports ``tvm`` (the compiler), kiln.frontend, kiln.passes or kiln.codegen.
"""

from .kv_cache import KVCache, KVCacheConfig, TVMPagedKVCache
from .llm import LLM, GenerationResult
from .model_runner import ModelRunner, prepare_step
from .sampler import SamplingParams

__all__ = ["KVCache", "KVCacheConfig", "LLM", "GenerationResult", "ModelRunner", "SamplingParams",
           "TVMPagedKVCache", "prepare_step"]
