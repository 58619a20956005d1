"""Codegen: targets as data, lowering and building per target, exporting the compiled library."""

from .targets import CPU_ARCHS, CUDA_ARCHS, TargetSpec, resolve_target

__all__ = ["CPU_ARCHS", "CUDA_ARCHS", "TargetSpec", "resolve_target"]
