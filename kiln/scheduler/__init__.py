"""Continuous batching (iteration-level scheduling, chunked prefill, preemption, prefix reuse).

Empty until the serving issue lands: today kiln/runtime/llm.py runs a static batch.
"""
