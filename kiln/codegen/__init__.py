"""Codegen: targets as data, lowering and building per target, exporting the compiled library."""

from .targets import CUDA_ARCHS, TargetSpec, resolve_target

__all__ = ["CUDA_ARCHS", "TargetSpec", "resolve_target"]
