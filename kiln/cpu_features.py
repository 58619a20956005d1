"""The host CPU's instruction-set flags: recorded by a ``native`` CPU build (kiln/codegen/targets.py) and
checked by the runtime before it loads an artifact (kiln/runtime/model_runner.py). No kiln imports."""

from __future__ import annotations

# /proc/cpuinfo names of the ISA extensions generated code may use: a ``native`` artifact records those of
# its host (more than LLVM may actually use, so a refusal errs on the safe side)
ISA_FLAGS = ("sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe",
             "avx_vnni", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512vbmi", "avx512_vbmi2", "avx512ifma", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16")


def host_cpu_flags() -> set[str] | None:
    """The CPU feature flags of this machine (Linux), or None where they cannot be read."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None
