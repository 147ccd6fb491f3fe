"""The CPU decode kernels (glmtorch/kernels): built here, equal to the plain products, callable from compiled
graphs, and only taken where they apply."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glmtorch import kernels
from glmtorch.fastpath import GemvLinear
from glmtorch.quantize import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(os.environ.get("GLMTORCH_KERNELS", "") == "0", reason="kernels turned off")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_kernels_build_here():
    assert kernels.available(), "the C++ kernels did not build (is g++ installed?)"


def test_a_build_made_before_loads_without_a_compiler(tmp_path):
    """An image made with its kernels built, run where there is no compiler: the build is loaded as it is (torch's
    builder would try to compile it again, its command line naming the missing compiler)."""
    assert kernels.available()
    child = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "from glmtorch import kernels; "
                            "print(kernels.available(), kernels.build_name())"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "CXX": str(tmp_path / "no-such-compiler")})
    assert child.returncode == 0 and child.stdout.split() == ["True", kernels.build_name()], child.stderr


def test_a_failed_build_is_told_by_the_compilers_error():
    ninja = RuntimeError("Error building extension 'x': [1/2] c++ -MMD -fopenmp -c a.cpp -o a.o\nFAILED: a.o\n"
                         "c++ -MMD -fopenmp -c a.cpp -o a.o\nc++: error: unsupported option '-fopenmp'\n"
                         "ninja: build stopped: subcommand failed.\n")
    assert kernels.why_failed(ninja) == "c++: error: unsupported option '-fopenmp'"
    assert kernels.why_failed(OSError("first\nlast line\n")) == "last line" and kernels.why_failed(OSError()) == ""


def test_a_native_build_is_named_for_its_cpu(tmp_path, monkeypatch):
    """Machines sharing a home folder (a cluster's, a container image's baked-in cache) must not load each other's
    -march=native builds: an AVX-512 machine's dies of an illegal instruction on an AVX2 one."""
    source = tmp_path / "k.cpp"
    source.write_text("int x;")
    names = {}
    for cpu, flags in (("avx2", ["fma", "avx2"]), ("avx512", ["fma", "avx2", "avx512f"])):
        monkeypatch.setattr(kernels, "cpu_model_and_flags", lambda flags=flags: ("CPU", flags))
        names[cpu] = (kernels.extension_name([str(source)], ["-O3", "-march=native"]),
                      kernels.extension_name([str(source)], ["-O3", "-march=x86-64-v3"]))
    assert names["avx2"][0] != names["avx512"][0]  # native: one build per instruction set
    assert names["avx2"][1] == names["avx512"][1]  # a named target runs on every CPU that has it: one build
    monkeypatch.setattr(kernels, "cpu_model_and_flags", lambda: ("CPU", ["avx2", "fma"]))  # order does not matter
    assert kernels.extension_name([str(source)], ["-O3", "-march=native"]) == names["avx2"][0]


@pytest.mark.parametrize("value, arch", [("", "native"), (" x86-64-v3 ", "x86-64-v3"), ("skylake-avx512", None),
                                         ("native -fno-x; touch /tmp/owned", ValueError), ("$(id)", ValueError)])
def test_the_build_target_comes_from_GLMTORCH_KERNELS_MARCH(value, arch, monkeypatch):
    """The value goes into the build's command line (ninja runs it through a shell): anything but a -march name
    is refused."""
    monkeypatch.setenv("GLMTORCH_KERNELS_MARCH", value)
    if arch is ValueError:
        with pytest.raises(ValueError, match="GLMTORCH_KERNELS_MARCH"):
            kernels.target_arch()
    else:
        assert kernels.target_arch() == (arch or value)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None,
                    reason="compiles the x86 kernels with g++")
def test_the_kernels_compile_for_avx512_and_amx():
    """The AVX-512 loops (with and without AVX512-BF16) and the AMX tiles are compiled only on CPUs that have them:
    a mistake there would leave such a machine without kernels (a warning and the slow library paths). Here every
    source is compiled (syntax and types, templates instantiated, nothing run) for Skylake-AVX512 and for Sapphire
    Rapids (AVX512-BF16, AMX), the two at once."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    folder = os.path.dirname(kernels.__file__)
    sources = [os.path.join(folder, name) for name in ("gemv.cpp", "decode_step.cpp", "elementwise.cpp")]
    includes = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]
    targets = {"skylake-avx512": ["__AVX512F__"], "sapphirerapids": ["__AVX512BF16__", "__AMX_TILE__"]}
    for arch, macros in targets.items():
        # the macros the sources test: the target really switches those branches on
        probe = subprocess.run(["g++", f"-march={arch}", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            pytest.skip(f"this g++ does not know -march={arch}")
        assert all(f"#define {m} 1" in probe.stdout for m in macros), (arch, macros)
    checks = {}
    for arch in targets:
        checks[arch] = subprocess.Popen(["g++", "-std=c++20", "-fsyntax-only", "-fopenmp", f"-march={arch}",
                                         "-DTORCH_EXTENSION_NAME=syntax_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                         *includes, *sources], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
    for arch, check in checks.items():
        output = check.communicate(timeout=600)[0]
        errors = [line for line in output.splitlines() if "error" in line]
        assert check.returncode == 0 and not errors, f"-march={arch}:\n" + "\n".join(errors[:20] or [output[-3000:]])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or bool(os.environ.get(
    "GLMTORCH_KERNELS_MARCH")), reason="builds the x86-64 baseline (and not again inside its own run)")
def test_the_plain_loops_pass_the_kernel_tests(tmp_path):
    """The loops a CPU without AVX2 runs (an ARM server's, an old x86's) are never built on a machine with AVX2:
    here they are (-march=x86-64, its own build folder and dispatch table), and this file's and test_fastpath's
    tests run against them in a child process. Its skip reasons show the build it had."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "GLMTORCH_KERNELS_MARCH": "x86-64", "GLMTORCH_DISPATCH_CACHE": str(tmp_path / "d.json")}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            os.path.join(here, "test_kernels.py"), os.path.join(here, "test_fastpath.py")],
                           env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert "built without AVX2" in child.stdout  # the child had the plain loops, not this machine's build


@torch.no_grad()
# 1-2 rows: fp32 weights 4 rows at a time, bf16 one row at a time; 3, 13, 31: register tiles of 4 x 3 (and the
# rows left over); 40, 64: packed panels of 16 weight rows in tiles of 6 rows (and 4 left over). 272 inputs are not
# a multiple of 32: bf16 weights take these widening paths even where AVX512-BF16's dot products exist (tested below)
@pytest.mark.parametrize("rows", [1, 2, 3, 13, 31, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# leaving 0, 1 or 3 after 4s, 1 or 2 after 3s, 8, 9 or 11 after 16s
@pytest.mark.parametrize("out_features", [1000, 1001, 1003])
def test_float_gemv_matches_linear(rows, dtype, out_features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, 272, generator=g).to(dtype)  # 272 inputs: panels take 256, then 16
    x = torch.randn(rows, 272, generator=g).to(dtype)
    expected = x.float() @ w.float().t()
    got = kernels.gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    assert rel(got, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 11, 64])  # 6-row tiles and 1-5 rows left over
@pytest.mark.parametrize("out_features", [64, 66, 67])  # 4-row weight tiles and 2 or 3 rows left over
def test_bf16_weights_with_fp32_rows_match_the_exact_product(rows, out_features):
    """fp32 x times bf16 weights: exact products summed in fp32, with x rounded to bf16 where the kernels take
    AVX512-BF16's dot products (from kernels.bf16_dot_rows() rows on, K a multiple of 32), as it is when a bf16
    model's activations meet its weights; x as it is otherwise."""
    if not kernels.available():
        pytest.skip("kernels not built")
    g = torch.Generator().manual_seed(rows * out_features)
    w = torch.randn(out_features, 320, generator=g).bfloat16()
    x = torch.randn(rows, 320, generator=g)
    dot = kernels.bf16_dot_rows()
    rounded = x.bfloat16() if dot and rows >= dot else x
    expected = rounded.double() @ w.double().t()
    got = torch.ops.glmtorch_kernels.gemv_float(x, w)
    assert rel(got, expected) < 1e-6
    if dot and rows >= dot:  # a row's sum does not depend on the rows beside it
        assert torch.equal(got[-1:], torch.ops.glmtorch_kernels.gemv_float(x[-1:].expand(dot, -1).contiguous(), w)[:1])


def test_blocks_hold_the_matrix():
    """pack_blocks: fp32 block b, input k holds W[16b + c, k] at c; bf16 block b, pair p holds W[16b + c, 2p + i] at
    2c + i; unpack_blocks gives W back."""
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6)
    blocks = kernels.pack_blocks(w)
    assert blocks.shape == (2, 6, 16) and blocks[1, 4, 5] == w[16 + 5, 4]
    assert torch.equal(kernels.unpack_blocks(blocks), w)
    pairs = kernels.pack_blocks(w.bfloat16())
    assert pairs.shape == (2, 3, 32) and pairs[1, 2, 2 * 5 + 1] == w[16 + 5, 2 * 2 + 1]
    assert torch.equal(kernels.unpack_blocks(pairs), w.bfloat16())


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 64, 131])  # 8-row tiles, 1-7 left over, past a 128-row pass
@pytest.mark.parametrize("shape", [(48, 64), (64, 30), (80, 320)])  # 3, 4 and 5 blocks of 16: tiles of 1-3 blocks
def test_blocks_give_the_exact_product(dtype, rows, shape):
    """gemv_blocks: x (rounded to bf16 for bf16 weights; a bf16 x as it is) times the weight, summed in fp32,
    whatever the rows; the bias added in fp32; the result in x's dtype, rounded once; gemv_float takes a weight in
    blocks the same way (the fused step's plans); a row's sum does not depend on the rows beside it."""
    if not kernels.takes_blocks(dtype, *shape):
        pytest.skip(f"the kernels here do not take {dtype} blocks (fp32: AVX2 or AVX-512; bf16: AVX512-BF16)")
    g = torch.Generator().manual_seed(rows * shape[0] + shape[1])
    w = torch.randn(*shape, generator=g).to(dtype)
    x = torch.randn(rows, shape[1], generator=g)
    bias = torch.randn(shape[0], generator=g)
    blocks = kernels.pack_blocks(w)
    expected = x.to(dtype).double() @ w.double().t()
    got = torch.ops.glmtorch_kernels.gemv_blocks(x, blocks)
    assert rel(got, expected) < 1e-6
    assert torch.equal(torch.ops.glmtorch_kernels.gemv_float(x, blocks), got)
    assert torch.equal(kernels.gemv_blocks(x[None], blocks, bias)[0], got + bias)
    assert torch.equal(got[-1:], torch.ops.glmtorch_kernels.gemv_blocks(x[-1:], blocks))
    if dtype == torch.bfloat16:  # x's dtype in and out, rounded once in the kernel
        assert torch.equal(torch.ops.glmtorch_kernels.gemv_blocks(x.bfloat16(), blocks), got.bfloat16())
        with_bias = kernels.gemv_blocks(x.bfloat16(), blocks, bias.bfloat16())
        assert torch.equal(with_bias, (got + bias.bfloat16()).bfloat16())
    with pytest.raises(RuntimeError, match="x must be contiguous fp32"):
        torch.ops.glmtorch_kernels.gemv_blocks(torch.randn(rows, shape[1] + 2), blocks)
    with pytest.raises(RuntimeError, match="pack_blocks"):
        torch.ops.glmtorch_kernels.gemv_blocks(x, w)


@torch.no_grad()
@pytest.mark.parametrize("order", [0, 1])  # fp32 weight rows side by side, one at a time
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("in_features", [320, 336])  # 336: a last 16 past the 32s
def test_both_fp32_row_orders_give_the_product(order, rows, in_features):
    if not kernels.available():
        pytest.skip("kernels not built")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1003, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    before = torch.ops.glmtorch_kernels.set_fp32_row_order(order)
    try:
        got = torch.ops.glmtorch_kernels.gemv_float(x, w)
    finally:
        torch.ops.glmtorch_kernels.set_fp32_row_order(before)
    assert rel(got, x.double() @ w.double().t()) < 1e-6
    with pytest.raises(RuntimeError, match="fp32 row order"):
        torch.ops.glmtorch_kernels.set_fp32_row_order(2)


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 5, 8, 20])
def test_int8_gemv_matches_dequantized_product(rows):
    g = torch.Generator().manual_seed(rows)
    layer = Int8Linear.from_linear(torch.nn.Linear(512, 300, bias=True))
    x = torch.randn(rows, 512, generator=g)
    assert kernels.usable(x, layer.weight, 512)
    expected = F.linear(x, layer.weight.float() * layer.scales[:, None], layer.bias)
    # activations are quantized to int8 per 32 values (llama.cpp's Q8_0 scheme): about 0.5% error
    assert rel(layer(x), expected) < 1e-2


@torch.no_grad()
@pytest.mark.parametrize("group,in_features", [(32, 256), (64, 256), (128, 256), (32, 224)])  # 224: not pairs of blocks
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 11])
def test_int4_gemv_matches_dequantized_product(group, in_features, scale_dtype, rows):
    # int4 layers keep fp16 scales; fp32 / bf16 ones come from older checkpoints or a later model.to(dtype)
    g = torch.Generator().manual_seed(group)
    dtype = torch.bfloat16 if scale_dtype == torch.bfloat16 else torch.float32
    layer = Int4Linear.from_linear(torch.nn.Linear(in_features, 100, bias=False).to(dtype), group_size=group)
    assert layer.scales.dtype == torch.float16
    layer.scales.data = layer.scales.data.to(scale_dtype)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    assert kernels.usable(x, layer.weight, in_features)
    expected = x.float() @ layer.dequantized(torch.float32).t()
    got = layer(x)
    assert got.dtype == dtype and rel(got, expected) < 2e-2


def skip_unless_int4_interleaved():
    if kernels.int4_row_interleave() == 1:
        pytest.skip("the kernels here read int4 rows one at a time (built without AVX2): loading keeps them plain")


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2, 11])
def test_int4_interleaved_rows_give_the_plain_layouts_results(rows):
    """Loading puts int4 rows in blocks of 4 for the kernels; results, dequantized rows and the state dict stay
    those of the plain layout (rows 1: the one-row block kernel, 2 and 11: row groups reading strided pairs)."""
    skip_unless_int4_interleaved()
    g = torch.Generator().manual_seed(rows)
    plain = Int4Linear.from_linear(torch.nn.Linear(256, 36, bias=True))
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 36, bias=True))
    layer.load_state_dict(plain.state_dict())
    assert layer.interleave_rows(kernels.int4_row_interleave()) and layer.interleave == 4
    assert not torch.equal(layer.weight, plain.weight)  # the memory layout did change
    x = torch.randn(rows, 256, generator=g)
    assert rel(layer(x), plain(x)) < 1e-6
    assert torch.equal(layer.dequantized(torch.float32, 5, 23), plain.dequantized(torch.float32, 5, 23))
    state = layer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    other = Int4Linear.from_linear(torch.nn.Linear(256, 36, bias=True))
    other.interleave_rows(4)
    other.load_state_dict(state)  # plain layout in, interleaved in memory
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.scales, layer.scales)
    odd = Int4Linear.from_linear(torch.nn.Linear(256, 30))  # 30 rows: not whole blocks, stays plain
    assert not odd.interleave_rows(4) and odd.interleave == 1
    layer.to(torch.bfloat16)  # bf16 scales: a layout every path reads again
    assert layer.interleave == 1 and torch.equal(layer.weight, plain.weight)
    assert rel(layer(x), plain.to(torch.bfloat16)(x)) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-interleaved"])
def test_integer_rows_come_out_the_same_alone_or_together(kind, monkeypatch):
    """Row i of a many-row product equals the same row alone, bit for bit: a speculative verify pass (several
    tokens of one sequence) then picks exactly what one-token steps pick."""
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")
    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(1024, 68, bias=False)
    layer = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear)
    if kind == "int4-interleaved":
        skip_unless_int4_interleaved()
        assert layer.interleave_rows(kernels.int4_row_interleave())
    x = torch.randn(9, 1024, generator=g) * 3
    together = layer(x)
    for rows in (1, 2, 5):
        for i in range(0, 9 - rows + 1, 3):
            assert torch.equal(layer(x[i:i + rows]), together[i:i + rows]), (rows, i)


def test_kernels_run_inside_a_compiled_graph():
    layer = GemvLinear(256, 64)
    x = torch.randn(1, 256)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)  # fullgraph: no break at the op
    assert rel(compiled, eager) < 1e-6


def test_kernels_are_not_taken_for_training_or_many_rows():
    layer = GemvLinear(64, 32)
    x = torch.randn(2, 64, requires_grad=True)
    out = layer(x)  # autograd: the library path, bit for bit
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        many = torch.randn(kernels.FLOAT_MAX_ROWS + 1, 64)  # a long prefill: the library's matrix product
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))


needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16 tiles on this CPU (or not granted)")


@needs_amx
@torch.no_grad()
# 1-16 rows: one group of x; 17, 40: groups of 16 and the rest (another tile configuration); 80 and 112 output
# features: a block of 64 weight rows, then one or three tiles
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 40])
@pytest.mark.parametrize("out_features", [80, 112, 256])
def test_amx_gemv_is_the_bf16_product_summed_in_fp32(rows, out_features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, 320, generator=g).bfloat16()
    x = torch.randn(rows, 320, generator=g)
    expected = x.bfloat16().double() @ w.double().t()  # x rounded to bf16, as a bf16 model's activations are
    got = kernels.gemv_amx(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert rel(got.double(), expected) < 1e-6
    assert torch.equal(kernels.gemv_amx(x.bfloat16(), w), got.bfloat16())


@needs_amx
@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 3, 9, 16, 17, 40])
@pytest.mark.parametrize("shape", [(64, 128), (80, 192), (48, 2816)])
def test_amx_int4_gives_the_vector_kernels_bits(rows, shape):
    """int4 on the AMX tiles equals the vector kernels bit for bit, and each row equals itself alone: a verify pass
    on the tiles picks the tokens one-row steps pick."""
    from glmtorch.quantize import Int4Linear

    torch.manual_seed(rows)
    layer = Int4Linear.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False))
    assert layer.interleave_rows(kernels.int4_row_interleave())
    assert kernels.takes_int4_amx(layer.weight, layer.scales, layer.group_size, layer.interleave)
    x = torch.randn(rows, shape[1]) * torch.logspace(-2, 2, shape[1])  # blocks of very different scales
    got = kernels.gemv_int4_amx(x, layer.weight, layer.scales)
    assert torch.equal(got, kernels.gemv_int4(x, layer.weight, layer.scales, 32, layer.interleave))
    alone = torch.cat([kernels.gemv_int4(x[i:i + 1], layer.weight, layer.scales, 32, layer.interleave)
                       for i in range(rows)])
    assert torch.equal(got, alone)


def test_amx_gemv_refuses_what_it_does_not_take():
    for w in (torch.randn(24, 64).bfloat16(), torch.randn(32, 48).bfloat16(), torch.randn(32, 64)):
        assert not kernels.takes_amx(w)
        with pytest.raises(RuntimeError, match="gemv_amx takes a bf16 weight|not available"):
            torch.ops.glmtorch_kernels.gemv_amx(torch.randn(2, w.shape[1]), w)
    assert kernels.takes_amx(torch.randn(32, 64).bfloat16())
    packed, scales = torch.zeros(24, 32, dtype=torch.uint8), torch.ones(24, 2, dtype=torch.float16)
    assert not kernels.takes_int4_amx(packed, scales, 32, 4)  # 24 rows: not whole tiles of 16
    with pytest.raises(RuntimeError, match="gemv_int4_amx takes row-interleaved|not available"):
        torch.ops.glmtorch_kernels.gemv_int4_amx(torch.randn(1, 64), packed, scales)


def test_bad_shapes_are_named():
    with pytest.raises(RuntimeError, match="group must be"):
        torch.ops.glmtorch_kernels.gemv_int4(torch.randn(1, 96), torch.zeros(4, 48, dtype=torch.uint8),
                                             torch.ones(4, 2), 48)
    with pytest.raises(RuntimeError, match="K must match"):
        torch.ops.glmtorch_kernels.gemv_float(torch.randn(1, 48), torch.randn(4, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_kernel_matches_the_eager_rotation(dtype, per_row):
    """kernels' rotary on a strided (B, T, N, D) view of a QKV output equals modeling.apply_rotary: the same bits in
    bf16 (it rounds where the eager ops round), within fp32 rounding in fp32; channels past the rotary part copied."""
    from glmtorch import kernels
    from glmtorch.modeling import apply_rotary

    if not kernels.available():
        pytest.skip("kernels not built")
    g = torch.Generator().manual_seed(3)
    B, T, N, D, R = 3, 5, 4, 24, 12
    qkv = (torch.randn(B, T, (N + 2) * D, generator=g) * 3).to(dtype)
    x = qkv[..., :N * D].view(B, T, N, D)
    cos = torch.randn(B if per_row else 1, 1, T, R, generator=g).to(dtype)
    sin = torch.randn(B if per_row else 1, 1, T, R, generator=g).to(dtype)
    got = torch.ops.glmtorch_kernels.rotary(x, cos, sin)
    expected = apply_rotary(x.transpose(1, 2), cos, sin)
    assert got.shape == (B, N, T, D) and got.is_contiguous()
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(got[..., R:], x.transpose(1, 2)[..., R:])


def by_element(pool: torch.Tensor) -> torch.Tensor:
    """The same (blocks, KV, block size, D) keys stored as a CPU PagedKVCache stores them: each block D x block
    size (cache.keys_by_element)."""
    return pool.transpose(-1, -2).contiguous().transpose(-1, -2)


@torch.no_grad()
# head sizes the vector loops take (16 - 128: keys a register's lanes at a time, a partial group at the end; on AVX2
# 64 and 128 are summed a piece of 32 values at a time, 16 four heads a pass) and one they do not (48; and 15, odd,
# for keys by element: their loop takes elements two at a time); blocks of 16 slots (groups fill blocks) and of 5
# (groups cut by every block's end; keys by element: the plain loop, not whole registers of slots); 3 and 10 query
# heads per key/value head (keys by element: fewer than a pass of heads, and a whole pass and the rest)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 48, 15])
@pytest.mark.parametrize("block", [16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys_stored", ["by slot", "by element"])
@pytest.mark.parametrize("per_kv", [3, 10])
def test_paged_attention_is_softmax_attention(head_dim, block, dtype, keys_stored, per_kv):
    """The decode attention of the fused step and the paged cache (paged_attention), read through scattered block
    tables, against float64 softmax attention over each row's visible slots: rows of different lengths (1 to 70
    slots), padding holes in the mask, 3 or 10 query heads per key/value head, keys stored slot by slot or by
    element; a pool full of NaN outside the written slots, so that a key or value read past a row's last slot or
    at a hole would show."""
    if head_dim == 15 and keys_stored == "by slot":
        pytest.skip("odd head sizes matter to the by-element loop only")
    g = torch.Generator().manual_seed(5)
    N, KV, D = 4, 2, head_dim
    Q = KV * per_kv
    lasts = torch.tensor([0, 15, 33, 69])
    L = int(lasts.max()) + 1
    per_row = -(-L // block)
    pool_blocks = N * per_row + 1
    keys = torch.full((pool_blocks, KV, block, D), float("nan"), dtype=dtype)
    values = keys.clone()
    if keys_stored == "by element":
        keys = by_element(keys)
    table = (torch.randperm(N * per_row, generator=g) + 1).view(N, per_row)
    visible = torch.rand(N, L, generator=g) > 0.2
    k_rows = torch.randn(N, L, KV, D, generator=g).to(dtype)
    v_rows = torch.randn(N, L, KV, D, generator=g).to(dtype)
    for n in range(N):
        visible[n, lasts[n]] = True
        for j in range(int(lasts[n]) + 1):
            if visible[n, j]:
                keys[table[n, j // block], :, j % block] = k_rows[n, j]
                values[table[n, j // block], :, j % block] = v_rows[n, j]
    q = torch.randn(N, Q, D, generator=g)
    scale = D ** -0.5
    got = torch.ops.glmtorch_kernels.paged_attention(q, keys, values, table, lasts, visible, scale)
    for n in range(N):
        seen = visible[n, :lasts[n] + 1].nonzero().flatten()
        k = k_rows[n, seen].double().repeat_interleave(Q // KV, 1)  # (S, Q, D)
        v = v_rows[n, seen].double().repeat_interleave(Q // KV, 1)
        weights = torch.softmax(torch.einsum("qd,sqd->qs", q[n].double(), k) * scale, -1)
        expected = torch.einsum("qs,sqd->qd", weights, v)
        assert rel(got[n], expected) < 1e-6, (n, rel(got[n], expected))


@torch.no_grad()
# head sizes 16 - 128 and an odd one (48); 3 and 8 query heads per key/value head; 23 tokens a prompt (69 and 184
# query heads a key/value head: tiles of groups of registers, the last partly padding) and 3 (9 and 24: 9 are too
# few for a tile, read a row at a time); blocks of 16 and of 5 slots; no mask, a causal one, one with holes
@pytest.mark.parametrize("head_dim, heads", [(16, 6), (32, 6), (64, 16), (128, 16), (48, 6)])
@pytest.mark.parametrize("T", [23, 3])
@pytest.mark.parametrize("block", [16, 5])
@pytest.mark.parametrize("mask", ["none", "causal", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys_stored", ["by slot", "by element"])
def test_prefill_attention_of_prompts_is_softmax_attention(head_dim, heads, T, block, mask, dtype, keys_stored):
    """paged_prefill_attention (a prefill pass's tokens over a pool, each key and value read once for a tile of
    tokens) against float64 softmax attention: three prompts of T new tokens after cached prefixes of 0, 9 and 40
    slots, each token seeing the slots up to its own (given no mask, or the model's mask saying just that) and,
    with holes, only the ones its mask keeps; keys stored slot by slot or by element; the pool is NaN outside the
    written slots, so a read past a token's visible slots would show."""
    masked = mask == "holes"
    g = torch.Generator().manual_seed(11)
    runs, KV, D = 3, 2, head_dim
    starts = torch.tensor([0, 9, 40])
    lasts = starts[:, None] + torch.arange(T)  # (runs, T)
    L = int(lasts.max()) + 1
    per_row = -(-L // block)
    keys = torch.full((runs * per_row + 1, KV, block, D), float("nan"), dtype=dtype)
    values = keys.clone()
    if keys_stored == "by element":
        keys = by_element(keys)
    table = (torch.randperm(runs * per_row, generator=g) + 1).view(runs, per_row)
    k_rows = torch.randn(runs, L, KV, D, generator=g).to(dtype)
    v_rows = torch.randn(runs, L, KV, D, generator=g).to(dtype)
    holes = torch.rand(runs, L, generator=g) < 0.2  # slots never written (padding), hidden from every token
    holes[:, 0] = False
    for r in range(runs):
        holes[r, starts[r]:] = False
        for j in range(int(lasts[r, -1]) + 1):
            if not (masked and holes[r, j]):
                keys[table[r, j // block], :, j % block] = k_rows[r, j]
                values[table[r, j // block], :, j % block] = v_rows[r, j]
    if mask == "none":
        visible = torch.empty(0, dtype=torch.bool)
    else:
        visible = (torch.arange(L) <= lasts[..., None]) & ~(holes[:, None, :] & masked)  # (runs, T, L)
        visible = visible.reshape(runs * T, L)
    q = torch.randn(runs, T, heads, D, generator=g)
    scale = D ** -0.5
    got = torch.ops.glmtorch_kernels.paged_prefill_attention(q, keys, values, table, lasts, visible, scale)
    assert got.shape == (runs, T, heads, D)
    for r in range(runs):
        for t in range(T):
            own = int(lasts[r, t])
            seen = torch.arange(own + 1)
            if masked:
                seen = seen[~holes[r, :own + 1]]
            k = k_rows[r, seen].double().repeat_interleave(heads // KV, 1)  # (S, Q, D)
            v = v_rows[r, seen].double().repeat_interleave(heads // KV, 1)
            weights = torch.softmax(torch.einsum("qd,sqd->qs", q[r, t].double(), k) * scale, -1)
            expected = torch.einsum("qs,sqd->qd", weights, v)
            assert rel(got[r, t], expected) < 1e-6, (r, t, rel(got[r, t], expected))


@torch.no_grad()
@pytest.mark.parametrize("T", [23, 3])  # tiles, and the row-at-a-time loop (9 query heads a key/value head)
@pytest.mark.parametrize("mask", ["none", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_skips_a_passs_padding(T, mask, dtype):
    """A right-padded pass (prompts of different lengths after cached prefixes) marks its padding tokens' slots -1:
    paged_prefill_attention gives each run's real tokens the same bits as a pass of that run alone (the tiles or
    the row-at-a-time loop by the run's own length, not the pass's: a prompt batched with longer ones is not
    summed in another order), zeros for the padding, whatever the padding's queries hold; padding before a real
    token is refused, named."""
    g = torch.Generator().manual_seed(5)
    runs, KV, heads, D, block = 3, 2, 6, 32, 16
    real = [T, max(1, T // 3), 1]  # 23: the first run's 69 query heads tile, the second's 21 do not
    starts = torch.tensor([0, 9, 40])
    lasts = starts[:, None] + torch.arange(T)
    L = int(lasts.max()) + 1
    per_row = -(-L // block)
    keys = torch.randn(runs * per_row + 1, KV, block, D, generator=g).to(dtype)
    values = torch.randn(runs * per_row + 1, KV, block, D, generator=g).to(dtype)
    table = (torch.randperm(runs * per_row, generator=g) + 1).view(runs, per_row)
    q = torch.randn(runs, T, heads, D, generator=g)
    seen = torch.arange(L) <= lasts[..., None]  # (runs, T, L)
    visible = seen.reshape(runs * T, L) if mask == "causal" else torch.empty(0, dtype=torch.bool)
    padded = lasts.clone()
    for r in range(runs):
        padded[r, real[r]:] = -1
    noisy = q.clone()
    noisy[padded < 0] = float("nan")  # a padding query is never read
    ops, scale = torch.ops.glmtorch_kernels, D ** -0.5
    got = ops.paged_prefill_attention(noisy, keys, values, table, padded, visible, scale)
    for r in range(runs):
        n = real[r]
        alone = ops.paged_prefill_attention(q[r:r + 1, :n], keys, values, table[r:r + 1], lasts[r:r + 1, :n],
                                            seen[r, :n] if mask == "causal" else visible, scale)
        assert torch.equal(got[r, :n], alone[0]), r
        assert torch.equal(got[r, n:], torch.zeros_like(got[r, n:])), r
    if T > 1:
        wrong = lasts.clone()
        wrong[0, 0] = -1
        with pytest.raises(RuntimeError, match="padding .* must come after all its real tokens"):
            ops.paged_prefill_attention(q, keys, values, table, wrong, visible, scale)


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [False, True])
def test_a_product_into_the_callers_buffer_is_the_product(rows, dtype, blocks):
    """gemv_float_out (the fused step's logits into a buffer the server reuses) writes gemv_float's result into the
    buffer given, for every layout and row path; a buffer of the wrong shape or dtype is refused, named."""
    if blocks and not kernels.takes_blocks(dtype, 64, 64):
        pytest.skip("no blocks for this dtype here")
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 64, generator=g).to(dtype)
    if blocks:
        weight = kernels.pack_blocks(weight)
    x = torch.randn(rows, 64, generator=g)
    out = torch.full((rows, 64), float("nan"))
    torch.ops.glmtorch_kernels.gemv_float_out(x, weight, out)
    assert torch.equal(out, torch.ops.glmtorch_kernels.gemv_float(x, weight))
    for wrong in (torch.empty(rows, 63), torch.empty(rows + 1, 64), torch.empty(rows, 64, dtype=torch.float64),
                  torch.empty(rows, 128)[:, ::2]):
        with pytest.raises(RuntimeError, match="out must be a contiguous"):
            torch.ops.glmtorch_kernels.gemv_float_out(x, weight, wrong)


@pytest.mark.parametrize("width", [1, 15, 16, 17, 3072, 3077])  # under, at and past one vector of 16
def test_greedy_rows_gives_torch_max_indices(width):
    """The kernels' greedy token per row equals logits.max(-1).indices: the first place on ties, a row's first
    NaN where it has one (wherever it is against the maximum), a row of -inf, an all-equal row, +inf, rows of a
    wider tensor (a row stride) and no rows at all; greedy_tokens takes it for fp32 CPU logits."""
    from glmtorch.generation.sampling import greedy_tokens

    g = torch.Generator().manual_seed(width)
    x = torch.randn(40, width + 3, generator=g)[:, 3:]  # rows of a wider tensor
    x[1] = float("-inf")
    x[2] = 0.5
    x[3, width // 2] = float("inf")
    x[4, -1] = float("nan")  # a NaN after the maximum
    x[5, 0], x[5, width // 3] = float("nan"), float("nan")
    x[6, width // 2:] = float("inf")  # ties at the maximum: the first
    x[7:] = torch.randint(0, 3, (33, width), generator=g).float()  # many ties
    expected = x.max(-1).indices
    assert torch.equal(torch.ops.glmtorch_kernels.greedy_rows(x), expected)
    assert torch.equal(greedy_tokens(x), expected)
    assert torch.ops.glmtorch_kernels.greedy_rows(x[:0]).shape == (0,)
