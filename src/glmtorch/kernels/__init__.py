"""CPU matrix-vector kernels for decoding (gemv.cpp), built on this machine the first time they are needed.

Why a C++ file: batch-1 decode is nothing but matrix-vector products, and on a CPU the library paths behind
F.linear and torch's weight-only kernels read weights at about half the memory bandwidth, while Inductor's
generated int8 / int4 loops fall onto a slow partial-vector load on AVX2. A plain loop that widens each weight
chunk once and multiplies it into every row gets much closer to the bandwidth at every precision (fp32, bf16,
int8, int4).

They take any number of rows (integer weights 8 at a time against each weight row, which stays in cache for the
next 8; float weights in register tiles, and from 32 rows on as a small packed matrix product; bf16 and int4
weights also on the AMX tiles where the CPU has them and the OS grants them); which products go to them rather
than to the library is measured on each machine (glmtorch.dispatch).

The library is compiled with -O3 -march=native by torch.utils.cpp_extension (a C++ compiler is needed; the
result is cached under ~/.cache/torch_extensions, so later sessions load it in a second). When it cannot be
built, glmtorch warns once and uses the library paths: slower, same results. GLMTORCH_KERNELS=0 turns it off.

The ops are registered as torch.ops.glmtorch_kernels.* with shape functions, so compiled graphs call them too.
decode_step.cpp adds torch.classes.glmtorch_kernels.DecodePlan: a whole decode step of an fp32 / int8 / int4
model in one call over these kernels (used by glmtorch.fastpath.FusedDecodeStep).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F

from ..cpuinfo import cpu_model_and_flags

# Up to this many rows the kernels beat the BLAS matrix product here, measured on the "small" shapes: integer
# weights 2-4x at 8-16 rows, even at 64, behind from 128 rows; float weights (packed panels) 1.2-2x at 64 rows,
# 1.05-1.4x at 256 (bf16 against widening + BLAS), behind from 512.
MAX_ROWS = 64
FLOAT_MAX_ROWS = 256
_lock = threading.Lock()
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels are loaded (building them on first call). False when disabled or unbuildable."""
    ready = _state.get("ready")
    if ready is not None:
        return ready
    with _lock:
        if "ready" not in _state:
            _state["ready"] = _build()
    return _state["ready"]


def _build() -> bool:
    if os.environ.get("GLMTORCH_KERNELS", "").lower() in ("0", "false", "no"):
        return False
    if hasattr(torch.ops, "glmtorch_kernels") and hasattr(torch.ops.glmtorch_kernels, "gemv_float"):
        return True
    folder = os.path.dirname(__file__)
    sources = [os.path.join(folder, name) for name in ("gemv.cpp", "decode_step.cpp", "elementwise.cpp")]
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        _put_ninja_on_path()
        flags = ["-O3", f"-march={target_arch()}", "-fopenmp"]
        # the header's text is in the build's name too: a change to it alone must rebuild
        name = _state["name"] = extension_name(sources + [os.path.join(folder, "vector_math.h")], flags)
        compiler = os.environ.get("CXX", "").strip() or "c++"  # what torch's builder runs
        library = os.path.join(_get_build_directory(name, verbose=False), f"{name}.so")
        if shutil.which(compiler) is not None:
            with _announce_build():
                load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                     is_python_module=False, verbose=False)
        elif os.path.isfile(library):  # built before (an image made with its cache): torch's builder would rebuild
            torch.ops.load_library(library)
        else:  # said in one line here: torch's builder would print a page-wide banner about the compiler first
            warnings.warn(f"glmtorch's CPU decode kernels need a C++ compiler and there is none ({compiler!r} is "
                          "not on PATH; CXX names another); decoding uses the slower library paths. Install g++ "
                          "to get them, or set GLMTORCH_KERNELS=0 to silence this.", stacklevel=3)
            return False
        _register_shapes()
        return True
    except Exception as e:  # a failed build, an unsupported platform: the library paths still work
        warnings.warn(f"glmtorch's CPU decode kernels could not be built ({type(e).__name__}: {why_failed(e)}); "
                      "decoding uses the slower library paths. Install a C++ compiler (g++) to get them, or set "
                      "GLMTORCH_KERNELS=0 to silence this.", stacklevel=3)
        return False


def why_failed(e: Exception) -> str:
    """The line of a failed build that says why: the compiler's first error (torch's message is every command ninja
    ran and all they printed, ending in "ninja: build stopped"), else its last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line.lower()), lines[-1] if lines else "")


def build_name() -> str:
    """The loaded kernels' build (extension_name), "none" without them: measured speed choices depend on it."""
    return _state.get("name", "none") if available() else "none"


def describe() -> dict:
    """Which kernels a figure ran with (benchmark reports): the build's name and the -march it was built for, or
    none where they did not build."""
    if not available():
        return {"build": "none", "march": None}
    return {"build": build_name(), "march": target_arch()}


def target_arch() -> str:
    """The -march the kernels are built for: `native` (this CPU's instruction sets), or GLMTORCH_KERNELS_MARCH
    (e.g. `x86-64-v3` for a build that every AVX2 machine of a fleet can load, or `x86-64`: the plain loops a CPU
    without AVX2, or an ARM one, runs; the tests build that too)."""
    arch = os.environ.get("GLMTORCH_KERNELS_MARCH", "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in arch):
        raise ValueError(f"GLMTORCH_KERNELS_MARCH={arch!r} is not a -march value such as native, x86-64-v3 or "
                         "skylake-avx512")
    return arch


def extension_name(sources: list[str], flags: list[str]) -> str:
    """The build's name, with a digest of its sources and flags: two glmtorch versions on one machine (two venvs,
    a CI checkout beside a working tree) build into folders of their own, instead of rebuilding one folder in
    turn, where one process could load the other's library mid-build (seen: a step() of the wrong signature).
    A `-march=native` build also digests this CPU's instruction sets (/proc/cpuinfo's flags): machines that share
    a home folder (a cluster's network home, a container image with its cache baked in, a VM moved to another host)
    each build their own, where an AVX-512 machine's build loaded on an AVX2 one dies of an illegal instruction."""
    digest = hashlib.sha256(" ".join(flags).encode())
    if "-march=native" in flags:
        digest.update(" ".join(sorted(cpu_model_and_flags()[1])).encode())
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"glmtorch_gemv_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _announce_build():
    """One line on a terminal while the kernels compile (first use on a machine): how long it takes, then how
    long it took. A cached build loads in well under a second and prints nothing."""
    start = time.perf_counter()
    shown = False

    def announce():
        nonlocal shown
        shown = True
        print("glmtorch: building the CPU decode kernels, once per machine and torch version (15-40 s on 2 "
              "cores)...", end="", file=sys.stderr, flush=True)

    timer = threading.Timer(1.0, announce) if sys.stderr.isatty() else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        if shown:
            print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _put_ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the `ninja` wheel (a dependency) puts it in the
    environment's bin folder, which is not on PATH when Python is run from a venv without activating it."""
    try:
        import ninja

        folders = [ninja.BIN_DIR]
    except (ImportError, AttributeError):
        folders = []
    folders.append(os.path.dirname(sys.executable))
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([f for f in folders if f not in path] + path)


def _register_shapes() -> None:
    @torch.library.register_fake("glmtorch_kernels::gemv_float")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0] * 16 if w.dim() == 3 else w.shape[0])

    @torch.library.register_fake("glmtorch_kernels::gemv_blocks")
    def _(x, w, bias=None):
        return x.new_empty(x.shape[0], w.shape[0] * 16)

    @torch.library.register_fake("glmtorch_kernels::gemv_amx")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("glmtorch_kernels::gemv_int4_amx")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("glmtorch_kernels::gemv_int8")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("glmtorch_kernels::gemv_int4")
    def _(x, w, scales, group, interleave=1):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("glmtorch_kernels::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("glmtorch_kernels::greedy_rows")
    def _(logits):
        return logits.new_empty(logits.shape[0], dtype=torch.long)

    @torch.library.register_fake("glmtorch_kernels::silu_mul")
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake("glmtorch_kernels::rotary")
    def _(x, cos, sin):
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3])

    @torch.library.register_fake("glmtorch_kernels::paged_attention")
    def _(q, keys, values, table, last, visible, scale):
        return torch.empty_like(q)


ROW_CHUNK = 4096  # output features widened at a time: bounded scratch memory whatever the matrix


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the most likely ids: logits.max(-1).indices (the first on ties; a row's first NaN, if it has
    one). fp32 rows on a CPU go through the greedy_rows kernel, the same ids: torch's reduction takes ~1 ns a value
    (64 rows of a 3,072-word vocabulary: 0.19 ms against ~0.02; of 151,552: 8.4 ms against ~1.5, AMD EPYC). Here,
    below both the fused step (which takes it where its LM head runs outside) and generation.sampling."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]
            and logits.stride(1) == 1 and not logits.requires_grad and available()):
        return torch.ops.glmtorch_kernels.greedy_rows(logits)
    return logits.max(dim=-1).indices


def widened_matmul(x: torch.Tensor, weight_rows, out_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ W.T computed in `dtype`, with W produced `ROW_CHUNK` output rows at a time by weight_rows(start, stop)
    (a bf16 matrix widened to fp32, an int8 / int4 one dequantized to fp32 or bf16): the library's matrix product
    without a dense copy of the whole weight. fp32 on CPUs that emulate bf16; bf16 on those with AVX512-BF16 or
    AMX (glmtorch.dispatch measures which)."""
    xw = x.to(dtype)
    parts = [F.linear(xw, weight_rows(i, min(i + ROW_CHUNK, out_features)))
             for i in range(0, out_features, ROW_CHUNK)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


def takes_width(weight: torch.Tensor, in_features: int) -> bool:
    """Whether the loops handle this input width: float weights a multiple of 16, int8 / int4 of their 32-value
    blocks."""
    return in_features % (16 if weight.is_floating_point() else 32) == 0


def usable(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> bool:
    """Whether a product of x (..., K) with this weight should take a kernel: CPU, few enough rows for the
    weight's kind, no autograd, an input width the loops handle, and the kernels built."""
    max_rows = FLOAT_MAX_ROWS if weight.is_floating_point() else MAX_ROWS
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() // in_features <= max_rows
            and weight.is_contiguous() and takes_width(weight, in_features)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and available())


def _rows_through(op, x: torch.Tensor, out_features: int, *args) -> torch.Tensor:
    """Run a kernel on x (..., K) as fp32 rows (M, K); the result comes back as (..., N) in x's dtype."""
    y = op(x.reshape(-1, x.shape[-1]).float().contiguous(), *args)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight.T for an fp32 or bf16 weight (N, K)."""
    return _rows_through(torch.ops.glmtorch_kernels.gemv_float, x, weight.shape[0], weight)


def amx_available() -> bool:
    """Whether the kernels were built with AMX (-march=native on a CPU with AMX-BF16 and AMX-INT8) and the OS grants this
    process the tile registers. A listed flag is not enough (a VM may refuse the tiles); whether AMX is also the
    faster path is measured (glmtorch.dispatch)."""
    if "amx" not in _state:
        _state["amx"] = available() and bool(torch.ops.glmtorch_kernels.amx_available())
    return _state["amx"]


def bf16_dot_rows() -> int:
    """From how many rows of x on gemv multiplies bf16 weights with AVX512-BF16's dot products (x rounded to bf16,
    as a bf16 model's activations are) instead of widening them to fp32; 0 (never) where -march=native does not
    target the instruction, or without the kernels."""
    return int(torch.ops.glmtorch_kernels.bf16_dot_min_rows()) if available() else 0


def takes_blocks(dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether a weight of this dtype and shape can be kept in blocks of 16 output rows (pack_blocks) for gemv_blocks:
    out_features a multiple of 16; fp32 where the kernels were built with AVX-512 or AVX2, bf16 (in_features even)
    with AVX512-BF16."""
    if not available() or out_features % 16:
        return False
    kinds = int(torch.ops.glmtorch_kernels.block_kinds())
    return bool(kinds & 1) if dtype == torch.float32 else (
        dtype == torch.bfloat16 and bool(kinds & 2) and in_features % 2 == 0)


def pack_blocks(weight: torch.Tensor) -> torch.Tensor:
    """An (N, K) matrix as N / 16 blocks of 16 output rows, each input's 16 weights side by side: fp32 as
    (N / 16, K, 16), [b, k, c] = W[16b + c, k]; bf16 with inputs in pairs, (N / 16, K / 2, 32), [b, p, 2c + i] =
    W[16b + c, 2p + i] (the operand VDPBF16PS multiplies against a broadcast pair of x). kernels/gemv.cpp,
    gemv_blocks."""
    N, K = weight.shape
    step = 2 if weight.dtype == torch.bfloat16 else 1
    blocks = weight.reshape(N // 16, 16, K // step, step).transpose(1, 2)  # (N / 16, K / step, 16, step)
    return blocks.reshape(N // 16, K // step, 16 * step).contiguous()


def unpack_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The (N, K) matrix back from pack_blocks' blocks."""
    count, steps, width = blocks.shape
    step = width // 16
    return blocks.reshape(count, steps, 16, step).transpose(1, 2).reshape(count * 16, steps * step).contiguous()


def gemv_blocks(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) for W kept as pack_blocks(W), any number of rows, sums and the bias in fp32, rounded
    once to x's dtype: fp32 weights take x in fp32; bf16 ones take x rounded to bf16 (a bf16 x goes in as it is)."""
    rows = x.reshape(-1, x.shape[-1])
    keep = rows.dtype == torch.float32 or (rows.dtype == torch.bfloat16 and blocks.dtype == torch.bfloat16)
    rows = rows.contiguous() if keep else rows.float().contiguous()
    y = torch.ops.glmtorch_kernels.gemv_blocks(rows, blocks, None if bias is None else bias.float().contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], blocks.shape[0] * 16)


def takes_amx(weight: torch.Tensor) -> bool:
    """Whether gemv_amx takes this weight: bf16 (N, K), N a multiple of 16 and K of 32, contiguous, on the CPU."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[0] % 16 == 0
            and weight.shape[1] % 32 == 0 and weight.is_contiguous() and weight.device.type == "cpu")


def gemv_amx(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight.T for a bf16 weight on the AMX tiles (x rounded to bf16, sums in fp32)."""
    return _rows_through(torch.ops.glmtorch_kernels.gemv_amx, x, weight.shape[0], weight)


def takes_int4_amx(packed: torch.Tensor, scales: torch.Tensor, group: int, interleave: int) -> bool:
    """Whether gemv_int4_amx takes these int4 weights ((N, K/2) packed): the row-interleaved CPU layout (4 rows,
    group 32, fp16 scales), N a multiple of 16, K of 64, on the CPU, with the tiles granted."""
    return (interleave == 4 and group == 32 and scales.dtype == torch.float16 and packed.shape[0] % 16 == 0
            and packed.shape[1] % 32 == 0 and packed.device.type == "cpu" and amx_available())


def gemv_int4_amx(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gemv_int4 of row-interleaved weights on the AMX-INT8 tiles: the same bits as the vector kernels, faster
    from a few rows of x on."""
    return _rows_through(torch.ops.glmtorch_kernels.gemv_int4_amx, x, packed.shape[0], packed, scales)


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for int8 weight (N, K) and per-row scales (N,). Like llama.cpp's Q8_0
    path, x is quantized to int8 in blocks of 32 for the product (one fp32 scale per block)."""
    return _rows_through(torch.ops.glmtorch_kernels.gemv_int8, x, weight.shape[0], weight, scales.contiguous())


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int,
              interleave: int = 1) -> torch.Tensor:
    """x @ W.T for int4 W stored two per byte (element 2i low nibble, 2i+1 high; value q + 8) with per-row,
    per-group scales (N, K / group), rows interleaved in blocks of `interleave` (see int4_row_interleave); x
    quantized to int8 in blocks of 32, as for int8."""
    return _rows_through(torch.ops.glmtorch_kernels.gemv_int4, x, packed.shape[0], packed, scales.contiguous(),
                         group, interleave)


def int4_row_interleave() -> int:
    """How many int4 weight rows the kernels want interleaved in one block (gemv.cpp: one sequential stream per
    block, each activation load serving every row of it; 1 when the kernels are not there or have no AVX2)."""
    return int(torch.ops.glmtorch_kernels.int4_row_interleave()) if available() else 1
