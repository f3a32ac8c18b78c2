"""`flaxpod plan`'s library: AOT-compile the real train step for a target and read what the compiler says.

The step compiled is `Trainer.step`, the very jit object `pretrain` runs, lowered with abstract
arguments (ShapeDtypeStruct leaves carrying the layout's shardings) on the target's devices: TPU
devices described by libtpu, or fake CPU devices standing in for GPUs. Nothing is allocated.

Figures per device come from `compiled.memory_analysis()` (peak = arguments + outputs - aliased
(donated) + temporaries + code, as MaxText's train_compile counts it) and `compiled.cost_analysis()`.
The predicted step time is the step's FLOPs (XLA's count, remat's recomputation included) at the
chips' bf16 peak: communication and memory traffic are not modelled, so it is a lower bound and the
MFU at that time (model FLOPs / step FLOPs) a ceiling.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flaxpod.train.checkpoint_files import abstract
from flaxpod.train.config import Config, ConfigError, micro_batch_size
from flaxpod.train.flops import flops_per_token
from flaxpod.train.loop import VOCAB_MULTIPLE
from flaxpod.train.targets import Target, tpu_devices
from flaxpod.train.trainer import Trainer

GiB = 1024**3
EXIT_DOES_NOT_FIT = 5
# The TPU compiler refuses a program that does not fit instead of returning its statistics.
_REFUSED_TEMPORARIES = re.compile(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TPU_OOM = re.compile(r"(RESOURCE_EXHAUSTED|Ran out of memory|exceeded? (?:hbm|HBM|memory) capacity)")


@dataclass
class Plan:
    """Everything `flaxpod plan` reports (bytes are per device unless the name says otherwise)."""

    target: str
    compiler: str
    cpu_estimate: bool  # memory figures come from the CPU compiler, not the target's
    chips: int
    mesh: dict[str, int]
    params: int
    params_nonembedding: int
    param_bytes: int
    optimizer_bytes: int
    state_bytes_total: int  # parameters + optimizer state, one copy, all devices together
    batch_bytes: int
    hbm_bytes: int
    peak_tflops: float  # bf16 per chip
    compile_seconds: float
    tokens_per_step: int
    model_flops_per_step: float  # the 6N + 12 L d T convention (train/flops.py), all devices
    arguments: int | None = None
    outputs: int | None = None
    aliased: int | None = None
    temporaries: int | None = None
    code: int | None = None
    peak: int | None = None
    flops_per_step: float = 0.0  # XLA's cost analysis of the step (remat's recomputation included), all devices
    step_seconds: float = 0.0  # flops_per_step at the chips' bf16 peak (compute only: a lower bound)
    mfu: float = 0.0  # model FLOPs / flops_per_step: the MFU at that step time, a ceiling
    fits: bool = False
    largest: list[tuple[str, int]] = field(default_factory=list)  # of the state, by parameter
    largest_temporaries: list[tuple[str, int]] = field(default_factory=list)  # of the compiled program
    compiler_refusal: str = ""  # the TPU compiler's out-of-memory report, when it refused
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def abstract_batch(cfg: Config, trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as pretraining on prepared data feeds it (packed rows: segment ids,
    positions and a loss mask), sharded like the trainer shards batches."""
    shape, sharding = (cfg.data.batch_size, cfg.model.seq_len), trainer.batch_sharding
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch


def resolve_for_plan(cfg: Config) -> Config:
    """The derived model fields pretraining fills from its tokenizer, filled without one: a
    SentencePiece vocabulary is trained to `tokenizer.vocab_size` ids (rounded up as pretrain does)."""
    m = cfg.model
    vocab = m.vocab_size
    if not vocab:
        if cfg.tokenizer.kind != "sentencepiece" or cfg.tokenizer.path:
            raise ConfigError("model.vocab_size: 0 (from the tokenizer) cannot be known without data; set it to plan")
        vocab = -(-cfg.tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, vocab_size=vocab, max_seq_len=m.max_seq_len or m.seq_len)
    )


def devices_for(target: Target) -> list:
    """The devices to compile for: libtpu's description of the slice(s), or this process's CPU devices."""
    if target.platform == "tpu":
        return tpu_devices(target)
    cpus = jax.devices("cpu")
    if len(cpus) < target.chips:
        raise RuntimeError(
            f"{target.name} needs {target.chips} CPU devices and this process has {len(cpus)}: "
            f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={target.chips}"
        )
    return cpus[: target.chips]


def shard_bytes(shapes, shardings) -> list[tuple[str, int]]:
    """(path, bytes on one device) of every leaf, from its shard shape."""
    out = []
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        nbytes = math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        out.append((jax.tree_util.keystr(path, simple=True, separator="/"), int(nbytes)))
    return out


def plan(cfg: Config, target: Target, hbm_bytes: int | None = None) -> Plan:
    """Compiles `cfg`'s train step for `target` and judges whether it fits."""
    cfg = resolve_for_plan(cfg)
    devices = devices_for(target)
    trainer = Trainer.from_config(cfg, devices=devices)
    layout = trainer.layout
    state = abstract(layout.shapes, layout.shardings)
    batch = abstract_batch(cfg, trainer)
    state_bytes = shard_bytes(layout.shapes, layout.shardings)
    params, params_ne = trainer.param_counts()
    m = cfg.model
    tokens = cfg.data.batch_size * m.seq_len
    report = Plan(
        target=target.name,
        compiler=target.compiler,
        cpu_estimate=target.platform != "tpu",
        chips=target.chips,
        mesh=dict(trainer.mesh.shape),
        params=params,
        params_nonembedding=params_ne,
        param_bytes=sum(b for name, b in state_bytes if name.startswith("params/")),
        optimizer_bytes=sum(b for name, b in state_bytes if name.startswith("opt_state/")),
        state_bytes_total=sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(layout.shapes)),
        batch_bytes=sum(b for _, b in shard_bytes(batch, [s.sharding for s in batch.values()])),
        hbm_bytes=hbm_bytes or target.chip.hbm_bytes,
        peak_tflops=target.chip.peak_flops / 1e12,
        compile_seconds=0.0,
        tokens_per_step=tokens,
        model_flops_per_step=flops_per_token(m.n_layer, m.d_model, m.seq_len, params_ne) * tokens,
        largest=sorted(state_bytes, key=lambda kv: -kv[1])[:5],
    )
    report.flops_per_step = step_flops(cfg, devices)
    report.step_seconds = report.flops_per_step / (target.chips * target.chip.peak_flops)
    report.mfu = report.model_flops_per_step / report.flops_per_step
    start = time.perf_counter()
    try:
        compiled = trainer.step.lower(state, batch).compile()
    except Exception as e:  # XlaRuntimeError; only the TPU compiler's out-of-memory refusal is a verdict
        if target.platform != "tpu" or not _TPU_OOM.search(str(e)):
            raise
        report.compile_seconds = time.perf_counter() - start
        report.compiler_refusal = str(e).strip()
        report.advice = advise(cfg, report)
        return report
    report.compile_seconds = time.perf_counter() - start
    _read_memory(compiled, report)
    report.largest_temporaries = largest_hlo_buffers(compiled.as_text())
    report.fits = report.peak <= report.hbm_bytes
    if not report.fits:
        report.advice = advise(cfg, report)
    return report


_HLO_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_HLO_BYTES = {"pred": 1, "bf16": 2}
_NOT_ALLOCATED = {"parameter", "get-tuple-element", "bitcast", "tuple"}  # views of buffers counted elsewhere


def largest_hlo_buffers(hlo_text: str, count: int = 6) -> list[tuple[str, int]]:
    """The largest arrays the compiled program materializes (results of instructions outside
    fusions; loop-carried tuples counted element by element), named by shape, opcode and the JAX
    operation they came from: what the temporaries are made of."""
    found: dict[str, int] = {}
    in_fusion = False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            in_fusion = "fus" in line.split("(")[0]  # a fused computation's insides are never allocated
            continue
        head, sep, rest = line.partition(" = ")
        if in_fusion or not sep:
            continue
        op = re.search(r"\s([a-z][\w-]*)\(", rest)
        if not op or op.group(1) in _NOT_ALLOCATED:
            continue
        where = re.search(r'op_name="([^"]*)"', rest)
        source = "/".join(where.group(1).split("/")[-2:]) if where else ""
        for dtype, dims in _HLO_ARRAY.findall(rest[: op.start()]):
            width = _HLO_BYTES.get(dtype) or max(int(re.search(r"\d+", dtype).group()) // 8, 1)
            nbytes = math.prod(int(d) for d in dims.split(",") if d) * width
            name = f"{dtype}[{dims}] {op.group(1)} {source}".strip()
            found[name] = max(found.get(name, 0), nbytes)
    return sorted(found.items(), key=lambda kv: -kv[1])[:count]


def _read_memory(compiled, report: Plan) -> None:
    mem = compiled.memory_analysis()
    report.arguments = int(mem.argument_size_in_bytes)
    report.outputs = int(mem.output_size_in_bytes)
    report.aliased = int(mem.alias_size_in_bytes)
    report.temporaries = int(mem.temp_size_in_bytes)
    report.code = int(mem.generated_code_size_in_bytes)
    report.peak = report.arguments + report.outputs - report.aliased + report.temporaries + report.code


def step_flops(cfg: Config, devices: list) -> float:
    """FLOPs of one train step, all devices, by XLA's cost analysis of the lowered (global) program.

    The analysis counts a loop's body once, so the scanned stack of n_layer blocks would count as
    one block, and the grad_accum micro-batches as one: the step is lowered unrolled with 1 and 2
    blocks on one micro-batch instead (lowering is cheap, nothing is compiled) and extrapolated.
    The blocks are identical, so this is right in depth to within 0.1% (checked against an unrolled
    step in tests/test_plan.py); over micro-batches it also multiplies the optimizer update (a few FLOPs
    per parameter, against 6 per parameter per token for the model).
    """
    accum = cfg.train.grad_accum
    micro_batch = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // accum)
    micro = dataclasses.replace(cfg, data=micro_batch, train=dataclasses.replace(cfg.train, grad_accum=1))
    # XLA's dots: the cost analysis counts no FLOPs in the CPU kernel's FFI calls (sharding/cpu_matmul.py)
    micro = dataclasses.replace(micro, mesh=dataclasses.replace(cfg.mesh, cpu_matmul="xla"))

    def flops(n_layer: int) -> float:
        model = dataclasses.replace(cfg.model, n_layer=n_layer, scan_layers=False)
        small = dataclasses.replace(micro, model=model)
        trainer = Trainer.from_config(small, devices=devices)
        state = abstract(trainer.layout.shapes, trainer.layout.shardings)
        return _unoptimized_flops(trainer.step.lower(state, abstract_batch(small, trainer)))

    one, two = flops(1), flops(2)
    return accum * (one + (cfg.model.n_layer - 1) * (two - one))


def _unoptimized_flops(lowered: jax.stages.Lowered) -> float:
    cost = lowered.cost_analysis()
    if cost is None:
        # Lowered for TPU devices that libtpu only describes: no TPU client here to run the analysis.
        # It reads nothing but the unoptimized HLO, so jax's own implementation runs it on the CPU
        # client (jax exposes it only privately; this is the call Lowered.cost_analysis makes).
        from jax._src.lib import _jax

        module = lowered.compiler_ir("hlo").as_hlo_module()
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost["flops"])


def advise(cfg: Config, report: Plan) -> list[str]:
    """What to change, from where the bytes go: the state (sharding), or activations (remat, batch)."""
    hbm = report.hbm_bytes
    state = report.param_bytes + report.optimizer_bytes
    mesh = report.mesh
    tips = []
    if state > 0.5 * hbm:
        if cfg.mesh.rules == "dp" or mesh["fsdp"] == 1:
            tips.append(
                f"parameters + optimizer state take {state / GiB:.1f} GiB of {hbm / GiB:.1f} GiB per device: "
                "shard them with mesh.rules=fsdp_tp mesh.fsdp=-1 mesh.data=1"
            )
        need = math.ceil(report.state_bytes_total / (0.5 * hbm))
        tips.append(
            f"parameters + optimizer state alone take {state / GiB:.1f} GiB per device; fully sharded they need "
            f"at least {need} chips of {hbm / GiB:.0f} GiB to leave half of HBM for activations: a larger slice"
            + (
                f", or mesh.data=1 (data={mesh['data']} keeps {mesh['data']} copies of the state)"
                if mesh["data"] > 1
                else ""
            )
        )
    rows = micro_batch_size(cfg) // max(mesh["data"] * mesh["fsdp"], 1)
    temporaries = report.temporaries
    if temporaries is None and (told := _REFUSED_TEMPORARIES.search(report.compiler_refusal)):
        # The TPU compiler's own figures (in its units): scale its available HBM to ours.
        required, available = (float(told.group(i)) * _UNITS[told.group(i + 1)] for i in (1, 3))
        temporaries = required / available * hbm
    room = hbm - state - report.batch_bytes
    if room > 0 and (temporaries is None or temporaries > 0.25 * hbm):
        if cfg.model.remat != "full":
            tips.append(
                f"model.remat=full (now {cfg.model.remat}): recompute each block's activations in the backward pass"
            )
        # Activations scale with the micro-batch: the smallest power-of-two split that leaves them room.
        split = 2 ** math.ceil(math.log2(temporaries / room)) if temporaries and room > 0 else 2
        split = max(2, min(split, rows))
        if rows > 1:
            tips.append(
                f"train.grad_accum={cfg.train.grad_accum * split}: the micro-batch goes from {rows} to {rows // split} "
                "rows per data-parallel shard (activations scale with it; the optimizer step is unchanged)"
            )
        else:
            tips.append(
                "the micro-batch is already one row per data-parallel shard: a shorter model.seq_len, more tensor "
                "parallelism (mesh.tensor), or a larger slice"
            )
    return tips


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 1024**2:,.1f} MiB"


def render(report: Plan) -> str:
    """The table `flaxpod plan` prints."""
    est = " (CPU-compiler estimate)" if report.cpu_estimate else ""
    mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
    rows = [
        ("target", f"{report.target}: {report.chips} chips, {_size(report.hbm_bytes)} HBM each"),
        ("compiler", f"{report.compiler}, {report.compile_seconds:.1f} s"),
        ("mesh", mesh),
        ("parameters", f"{report.params:,} ({report.params_nonembedding:,} non-embedding)"),
        ("parameters / device", _size(report.param_bytes)),
        ("optimizer state / device", _size(report.optimizer_bytes)),
        ("batch / device", _size(report.batch_bytes)),
        (f"arguments / device{est}", _size(report.arguments)),
        (f"outputs / device{est}", f"{_size(report.outputs)} ({_size(report.aliased)} donated in place)"),
        (f"temporaries / device{est}", _size(report.temporaries)),
        (f"code / device{est}", _size(report.code)),
        (f"peak / device{est}", _size(report.peak)),
        ("tokens / step", f"{report.tokens_per_step:,}"),
        ("model FLOPs / step", f"{report.model_flops_per_step:.3e} (6N + 12*L*d*T per token)"),
    ]
    rows += [
        ("FLOPs / step", f"{report.flops_per_step:.3e} (XLA cost analysis, remat included, all devices)"),
        (
            "step time at peak",
            f"{report.step_seconds:.3f} s ({report.chips} x {report.peak_tflops:.0f} TFLOP/s bf16; "
            "no communication: a lower bound)",
        ),
        ("MFU at that step time", f"{report.mfu:.1%} (model / step FLOPs: a ceiling)"),
    ]
    verdict = "fits" if report.fits else "DOES NOT FIT"
    if report.peak is not None:
        verdict += f": peak {_size(report.peak)} of {_size(report.hbm_bytes)} ({report.peak / report.hbm_bytes:.0%})"
    rows.append(("verdict", verdict))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if not report.fits:
        lines.append("largest state buffers / device:")
        lines += [f"  {name:<48} {_size(nbytes)}" for name, nbytes in report.largest]
        if report.largest_temporaries:
            lines.append("largest arrays of the compiled step / device:")
            lines += [f"  {_size(nbytes):>12}  {name}" for name, nbytes in report.largest_temporaries]
        if report.compiler_refusal:
            lines.append("the TPU compiler refused the program:")
            lines += ["  " + line for line in report.compiler_refusal.splitlines()[:24]]
        lines.append("to make it fit:")
        lines += [f"  - {tip}" for tip in report.advice]
    return "\n".join(lines)
