"""The model runner: load an artifact's library and weights, execute one forward step on the VM.

Weights come from the artifact's params.safetensors, or, with ``random_weights=SEED``, are created
on the device from a seeded generator in the artifact's own parameter layout (never reading the
file): an artifact compiled from config.json alone runs that way, for benchmarks. ``params=`` hands
the runner tensors already in that layout (a parity check against another engine's weights).

No policy here: the caller (kiln/runtime/llm.py now, kiln/scheduler later) decides which sequences
run and with how many tokens; the runner prepares host inputs (``prepare_step``, pure NumPy and
CPU-testable), calls the right entry point and returns one row of logits per sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..artifact import Artifact
from ..cpu_features import host_cpu_flags
from ..errors import ArtifactError, KilnError
from ..ir.abi import entry_points
from .kv_cache import KVCacheConfig, TVMPagedKVCache
from .kv_groups import GroupedKVCache
from .tvm_runtime import DEVICE_TYPES, global_func, load_runtime


@dataclass(frozen=True)
class StepInputs:
    """Host-side inputs of one forward step over ``b`` sequences."""

    entry: str  # which ABI entry point runs it
    token_ids: np.ndarray  # [n] int32, the sequences' new tokens concatenated
    append_lens: list[int]  # [b]
    logit_positions: np.ndarray  # [b] int32, index in token_ids of each sequence's last token


def prepare_step(token_lists: list[list[int]], grouped: bool = False) -> StepInputs:
    """``grouped``: kiln's grouped-KV artifacts have one entry point for every step, ``batch_prefill``."""
    assert token_lists and all(len(t) > 0 for t in token_lists)
    lens = [len(t) for t in token_lists]
    ids = np.fromiter((t for ts in token_lists for t in ts), dtype=np.int32, count=sum(lens))
    positions = (np.cumsum(lens) - 1).astype(np.int32)
    if grouped:
        entry = "batch_prefill"
    elif all(n == 1 for n in lens):
        entry = "decode" if len(lens) == 1 else "batch_decode"
    else:
        entry = "prefill" if len(lens) == 1 else "batch_prefill"
    return StepInputs(entry, ids, lens, positions)


def _check_cpu_flags(artifact: Artifact) -> None:
    """An artifact built for wider vectors would die of an illegal instruction on an older CPU: refuse it."""
    need = set(artifact.target.get("cpu_flags", ()))
    have = host_cpu_flags()
    if need and have is not None and not need <= have:
        arch = artifact.target.get("arch")
        if artifact.target.get("mcpu"):
            arch = f"{arch} ({artifact.target['mcpu']})"
        raise ArtifactError(f"{artifact.path} was compiled for {arch}, which needs CPU features "
                            f"this machine lacks ({', '.join(sorted(need - have))}); recompile with a lower --arch")


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path, names: list[str]):
    """Yield ``(name, tensor)`` for ``names`` from a safetensors file, each a fresh torch CPU tensor (64-byte
    aligned: c10's CPU allocator) filled by reading the file into it — no memory map, no second copy."""
    import json
    import struct

    import torch

    with open(path, "rb") as f:
        try:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        except (struct.error, ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{path} is not a safetensors file") from None
        missing = [n for n in names if n not in header]
        if missing:
            raise ArtifactError(f"{path} lacks {', '.join(missing[:5])}")
        for name in names:
            info = header[name]
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise ArtifactError(f"{path}: {name} has dtype {info.get('dtype')!r}, which kiln does not read")
            t = torch.empty(info["shape"], dtype=getattr(torch, SAFETENSORS_DTYPES[info["dtype"]]))
            start, end = info["data_offsets"]
            view = t.reshape(-1).view(torch.uint8).numpy()
            if end - start != view.nbytes:
                raise ArtifactError(f"{path}: {name}'s data is {end - start} bytes, its shape needs {view.nbytes}")
            f.seek(8 + size + start)
            if f.readinto(memoryview(view)) != view.nbytes:
                raise ArtifactError(f"{path} is truncated (in {name})")
            yield name, t


RANDOM_STD = 0.02  # transformers' initializer_range: activations and logits stay well inside fp16's range


def random_parameter(name: str, shape: tuple[int, ...], dtype: str, generator, device: str):
    """One parameter of seeded random values, created on ``device``: ones for a norm weight (so every
    layer passes its input on at unit scale), normal(0, RANDOM_STD) for any other float tensor (biases
    too), uniform integers across an integer dtype's range (packed quantized weights)."""
    import torch

    dt = getattr(torch, dtype, None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize >= 2:
        if len(shape) == 1 and name.rsplit(".", 1)[-1].endswith("norm"):
            return torch.ones(shape, dtype=dt, device=device)
        return torch.empty(shape, dtype=dt, device=device).normal_(0.0, RANDOM_STD, generator=generator)
    if isinstance(dt, torch.dtype) and dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint32,
                                              torch.int64):
        info = torch.iinfo(dt)
        via = torch.int64 if dt == torch.uint32 else dt  # CUDA has no random integers of uint32
        return torch.randint(info.min, info.max, shape, dtype=via, device=device, generator=generator).to(dt)
    raise ArtifactError(f"parameter {name} has dtype {dtype!r}, for which kiln cannot make random weights")


class ModelRunner:
    def __init__(self, artifact: Artifact, device: str | None = None, kv_config: KVCacheConfig | None = None,
                 random_weights: int | None = None, params: dict | None = None):
        device = device or artifact.target["device"]
        if device != artifact.target["device"]:
            raise ArtifactError(f"{artifact.path} was compiled for {artifact.target['device']}, not {device}")
        if random_weights is None and params is None and not artifact.has_weights:
            raise ArtifactError(f"{artifact.path} holds no weights (compiled with --config-only): pass random weights "
                                "(`kiln bench --random-weights SEED`, EngineConfig(random_weights=SEED) or "
                                "ModelRunner(..., random_weights=SEED))")
        self.artifact, self.spec, self.device = artifact, artifact.spec, device
        _check_cpu_flags(artifact)
        ffi = load_runtime(device)
        self._ffi = ffi
        try:
            lib = ffi.load_module(str(artifact.library))
            self.vm = lib["vm_load_executable"]()
            if device == "cuda":  # (device type, id, pooled allocator) per device; the host comes last
                self.vm["vm_initialization"](DEVICE_TYPES["cuda"], 0, 2, DEVICE_TYPES["cpu"], 0, 2)
            else:
                self.vm["vm_initialization"](DEVICE_TYPES["cpu"], 0, 2)
        except Exception as e:  # tvm_ffi surfaces loader and driver failures as generic errors
            raise ArtifactError(f"cannot load {artifact.library} on {device}: {str(e).strip().splitlines()[-1]}") \
                from None
        self.fns = {}
        self.grouped = self.spec.grouped_kv
        for name in entry_points(self.grouped):
            try:
                self.fns[name] = self.vm[name]
            except Exception:  # tvm_ffi raises AttributeError/RuntimeError for a missing function
                raise ArtifactError(f"{artifact.path}: the library has no entry point {name!r}") from None
        self._reshape = global_func("vm.builtin.reshape")
        self._inflight: list = []
        self.last_timing = (0.0, 0.0, 0.0)  # seconds of the last forward: input preparation, model, output wrap
        self.random_weights = random_weights
        self.params = (self._given_params(params) if params is not None else self._load_params()
                       if random_weights is None else self._random_params(random_weights))
        cfg = kv_config or KVCacheConfig.for_model(self.spec.context_len, self.spec.kv_bytes_per_token)
        if cfg.prefill_chunk_size > cfg.max_total_tokens:
            raise KilnError("prefill_chunk_size must not exceed the KV cache's max_total_tokens")
        bound = artifact.manifest.options.max_batch_size
        if bound is not None and cfg.max_num_seqs > bound:  # its decode graphs' buffers hold that many rows
            raise KilnError(f"{artifact.path} runs at most {bound} sequences per decode step (compiled with "
                            f"--max-batch-size {bound}); lower --max-num-seqs from {cfg.max_num_seqs}, or recompile")
        self.kv = GroupedKVCache(self.spec, cfg, device, ffi) if self.grouped else TVMPagedKVCache(self.vm, cfg)

    def _load_params(self) -> list:
        """The weights, each read from params.safetensors straight into its own 64-byte aligned buffer (TVM's
        kernels assume that alignment; a tensor sliced out of the file is not aligned), one at a time: peak
        memory is the weights once, not the file's copy plus the aligned one. On a GPU each goes to the device
        and its host buffer is dropped."""
        names = self.artifact.param_names
        self._keep = []
        for name, t in read_safetensors(self.artifact.params_file, names):
            self._keep.append(t.to("cuda") if self.device == "cuda" else t)
        if self.artifact.manifest.param_shapes is not None:
            for (name, (shape, dtype)), t in zip(self.artifact.param_layout.items(), self._keep):
                if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                    raise ArtifactError(f"{self.artifact.params_file}: {name} is {str(t.dtype)[6:]} {tuple(t.shape)}, "
                                        f"the manifest says {dtype} {shape}")
        return [self._ffi.from_dlpack(t) for t in self._keep]

    def _given_params(self, params: dict) -> list:
        """``params`` (name -> torch tensor on the runner's device) in the artifact's layout, checked against it."""
        layout = self.artifact.param_layout
        if set(params) != set(layout):
            missing, extra = sorted(set(layout) - set(params)), sorted(set(params) - set(layout))
            raise ArtifactError(f"params do not match {self.artifact.path}'s layout: missing {missing[:3]}, "
                                f"unknown {extra[:3]}")
        self._keep = []
        for name, (shape, dtype) in layout.items():
            t = params[name].contiguous()
            if tuple(t.shape) != tuple(shape) or str(t.dtype).removeprefix("torch.") != dtype:
                raise ArtifactError(f"param {name} is {str(t.dtype)[6:]} {tuple(t.shape)}, the artifact wants "
                                    f"{dtype} {tuple(shape)}")
            self._keep.append(t)
        return [self._ffi.from_dlpack(t) for t in self._keep]

    def _random_params(self, seed: int) -> list:
        """Every parameter of the artifact's layout, seeded random, made on the device (same seed, same weights)."""
        import torch

        generator = torch.Generator(device=self.device).manual_seed(seed)
        self._keep = [random_parameter(name, shape, dtype, generator, self.device)
                      for name, (shape, dtype) in self.artifact.param_layout.items()]
        return [self._ffi.from_dlpack(t) for t in self._keep]

    def _to_device(self, a: np.ndarray):
        import torch

        # torch allocations are 64-byte aligned, as TVM's kernels assume (NumPy only guarantees 16).
        t = torch.from_numpy(np.ascontiguousarray(a)).to("cuda" if self.device == "cuda" else "cpu", copy=True)
        self._inflight.append(t)  # kept alive until the step's call returns
        return self._ffi.from_dlpack(t)

    def _to_host(self, t) -> np.ndarray:
        if self.device == "cuda":
            import torch

            return torch.from_dlpack(t).cpu().numpy()
        # A view, no copy: the array keeps the VM's output tensor alive, and the VM allocates each call's
        # outputs afresh, so the next step cannot write into it.
        return np.from_dlpack(t)

    def forward(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        """Append ``token_lists[i]`` to sequence ``seq_ids[i]``; return logits [b, V] float32 of each last token."""
        logits = self.forward_logits(seq_ids, token_lists)
        return logits.cpu().numpy() if logits.device.type != "cpu" else logits.numpy()

    def forward_logits(self, seq_ids: list[int], token_lists: list[list[int]]):
        """``forward``, its logits left where the model wrote them: a torch tensor [b, V] float32 on the
        runner's device, not copied; read it before the next step. On a GPU the engine samples there and
        only ids (and the rows under a grammar) come to the host."""
        import torch

        t0 = time.perf_counter()
        step = prepare_step(token_lists, self.grouped)
        n, b, H = len(step.token_ids), len(seq_ids), self.spec.hidden_size
        if n > self.kv.config.prefill_chunk_size:
            raise KilnError(f"a step of {n} tokens exceeds prefill_chunk_size={self.kv.config.prefill_chunk_size}")
        S = self._ffi.Shape
        self._inflight = []
        ids = self._to_device(step.token_ids)
        pos = self._to_device(step.logit_positions) if step.entry == "batch_prefill" else None
        t1 = time.perf_counter()
        embeds = self.fns["embed"](ids, self.params)  # [n, H]
        self.kv.begin_forward(seq_ids, step.append_lens)
        try:
            if step.entry == "batch_decode":
                out = self.fns["batch_decode"](self._reshape(embeds, S([b, 1, H])), *self.kv.args, self.params)
            elif step.entry == "batch_prefill":
                out = self.fns["batch_prefill"](self._reshape(embeds, S([1, n, H])), pos, *self.kv.args, self.params)
            else:
                out = self.fns[step.entry](self._reshape(embeds, S([1, n, H])), *self.kv.args, self.params)
        finally:
            self.kv.end_forward()
        t2 = time.perf_counter()
        logits = (torch.from_dlpack(out[0]) if self.device == "cuda" else torch.from_numpy(np.from_dlpack(out[0])))
        self.last_timing = (t1 - t0, t2 - t1, time.perf_counter() - t2)  # inputs, model (launched), logits
        return logits.reshape(b, -1)

    def prefill_rows(self, seq_id: int, token_ids: list[int], positions: np.ndarray) -> np.ndarray:
        """Append ``token_ids`` to sequence ``seq_id`` in one ``batch_prefill`` call; return the logits
        [len(positions), V] float32 of the tokens at ``positions`` (indices into ``token_ids``).

        ``forward`` asks for each sequence's last row only; scoring (kiln eval) needs every row, which
        the same entry point gives when asked for them."""
        n, H = len(token_ids), self.spec.hidden_size
        if not 0 < n <= self.kv.config.prefill_chunk_size:
            raise KilnError(f"prefill_rows takes 1 to {self.kv.config.prefill_chunk_size} tokens, got {n}")
        if len(positions) == 0 or positions.min() < 0 or positions.max() >= n:
            raise KilnError(f"prefill_rows: positions must be in [0, {n})")
        S = self._ffi.Shape
        self._inflight = []
        ids = self._to_device(np.asarray(token_ids, dtype=np.int32))
        pos = self._to_device(np.asarray(positions, dtype=np.int32))
        embeds = self.fns["embed"](ids, self.params)  # [n, H]
        self.kv.begin_forward([seq_id], [n])
        try:
            out = self.fns["batch_prefill"](self._reshape(embeds, S([1, n, H])), pos, *self.kv.args, self.params)
        finally:
            self.kv.end_forward()
        return self._to_host(out[0]).reshape(len(positions), -1)
