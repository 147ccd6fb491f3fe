"""The CPU linear dispatch: every path gives the product, a forced path is honoured, and the measured table is
written once, reused, and survives being corrupted. Every path is exercised through the library calls that exist
on every CPU, whatever this machine's measurement would pick."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from glmtorch import dispatch, kernels
from glmtorch.fastpath import GemvLinear
from glmtorch.quantize import Int4Linear, Int8Linear

from conftest import rel_err


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A dispatch table of this test's own."""
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv("GLMTORCH_DISPATCH_CACHE", str(path))
    dispatch.forget()
    yield path
    dispatch.forget()


def layers(dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 80, bias=True)
    out = {"float": GemvLinear(96, 80, dtype=dtype)}
    with torch.no_grad():
        out["float"].weight.copy_(base.weight.to(dtype))
        out["float"].bias.copy_(base.bias.to(dtype))
    if dtype == torch.float32 or dtype == torch.bfloat16:
        out["int8"] = Int8Linear.from_linear(base.to(dtype))
        out["int4"] = Int4Linear.from_linear(base.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 64, 200, 512])
def test_every_path_gives_the_same_product(table, monkeypatch, dtype, rows):
    x = torch.randn(rows, 96).to(dtype)
    for name, layer in layers(dtype).items():
        kind, paths = layer.cpu_paths(dtype)
        reference = x.double() @ (layer.weight.double() if name == "float" else
                                  layer.dequantized(torch.float64)).T
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: within its rounding
        if name != "float":  # int8 / int4 kernels quantize the activations in blocks of 32, as llama.cpp does
            tolerance = max(tolerance, 2e-2)
        assert {"widen_fp32"} <= set(paths) or "library" in paths
        for path in paths:
            monkeypatch.setenv("GLMTORCH_LINEAR_PATH", path)
            with torch.no_grad():
                y = layer(x)
            bias = layer.bias.double() if layer.bias is not None else 0
            assert y.dtype == dtype and y.shape == (rows, 80)
            assert rel_err(y.double() - bias, reference) < tolerance, (name, path)


def test_forced_path_is_honoured_and_checked(table, monkeypatch):
    layer = GemvLinear(64, 32)
    calls = []
    real_gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: (calls.append("kernel"), real_gemv(*a))[1])
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "kernel")
    with torch.no_grad():
        layer(torch.randn(300, 64))  # far past any measured kernel range: still the kernel, as forced
    assert calls == ["kernel"]
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    with torch.no_grad():
        x = torch.randn(2, 64)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # bit for bit the library's
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "fastest")
    with pytest.raises(ValueError, match="GLMTORCH_LINEAR_PATH='fastest'"):
        with torch.no_grad():
            layer(x)


def test_a_forced_path_does_not_become_the_machines_choice(table, monkeypatch):
    """A whole-step decision made under GLMTORCH_LINEAR_PATH follows the forced path and is not kept: the next
    process without the variable measures for itself."""
    monkeypatch.setenv("GLMTORCH_LINEAR_PATH", "library")
    assert dispatch.decide("fused-step test rows<=8", lambda: "library") == "library"
    assert not table.exists() or "fused-step test rows<=8" not in json.loads(table.read_text())["choices"]
    monkeypatch.delenv("GLMTORCH_LINEAR_PATH")
    assert dispatch.decide("fused-step test rows<=8", lambda: "kernel") == "kernel"
    assert json.loads(table.read_text())["choices"]["fused-step test rows<=8"] == "kernel"


def test_table_is_written_once_and_reused(table, monkeypatch):
    layer = GemvLinear(128, 48)
    with torch.no_grad():
        layer(torch.randn(5, 128))
    saved = json.loads(table.read_text())
    assert saved["machine"] == dispatch.machine() and saved["format"] == dispatch.FORMAT
    assert list(saved["choices"]) == ["float32 48x128 rows<=8"]
    assert dispatch.decisions() == saved["choices"]
    dispatch.forget()  # a new process: the table is read, nothing is measured again
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("measured again"))
    with torch.no_grad():
        layer(torch.randn(7, 128))
    assert dispatch.decisions() == saved["choices"]
    mtime = table.stat().st_mtime_ns
    with torch.no_grad():
        layer(torch.randn(6, 128))
    assert table.stat().st_mtime_ns == mtime  # not rewritten for a known bucket


def test_a_table_of_another_machine_is_measured_again(table):
    table.write_text(json.dumps({"format": 1, "machine": "some other CPU", "choices": {"float32 48x128 rows<=8": "library"}}))
    layer = GemvLinear(128, 48)
    with torch.no_grad():
        layer(torch.randn(5, 128))
    assert json.loads(table.read_text())["machine"] == dispatch.machine()


def test_a_table_measured_with_other_kernels_is_measured_again(table):
    """Another build of the kernels (a glmtorch upgrade) may change which path wins: the machine key names it."""
    from glmtorch import kernels

    assert f"kernels {kernels.build_name()}" in dispatch.machine() and kernels.build_name().startswith("glmtorch_gemv_")
    other = dispatch.machine().replace(kernels.build_name(), "glmtorch_gemv_000000000000")
    table.write_text(json.dumps({"format": dispatch.FORMAT, "machine": other,
                                 "choices": {"float32 48x128 rows<=8": "library"}}))
    layer = GemvLinear(128, 48)
    with torch.no_grad():
        layer(torch.randn(5, 128))
    assert json.loads(table.read_text())["machine"] == dispatch.machine()


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"choices": 5})])
def test_a_corrupted_table_is_ignored_with_a_warning(table, content):
    table.write_text(content)
    layer = GemvLinear(128, 48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = layer(torch.randn(5, 128))
    assert y.shape == (5, 48)
    assert any("ignoring the unreadable dispatch cache" in str(w.message) for w in caught)
    assert json.loads(table.read_text())["choices"]  # rewritten whole


def test_the_measurement_picks_the_faster_path(table):
    import time

    slow = lambda x: (time.sleep(0.002), x.sum())[1]  # noqa: E731
    fast = lambda x: x.sum()  # noqa: E731
    assert dispatch.choose("test", 1, 8, 4, {"library": slow, "kernel": fast}, torch.float32) == "kernel"
    assert dispatch.choose("test", 2, 8, 4, {"library": fast, "kernel": slow}, torch.float32) == "library"
    assert dispatch.row_bucket(3) == 4 and dispatch.row_bucket(513) == 512 and dispatch.row_bucket(1) == 1


def test_compiled_graph_dispatches_at_run_time(table, monkeypatch):
    layer = GemvLinear(64, 32)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (2, 9, 40):
            x = torch.randn(rows, 64)
            assert rel_err(compiled(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
    assert {k.split("<=")[1] for k in dispatch.decisions()} == {"2", "16", "64"}


def test_packing_per_call_is_a_candidate_for_prefill_sized_batches_only(table, monkeypatch):
    """Reordering a weight for one product can pay only where the product is compute-bound (many rows); below
    PACK_PER_CALL_ROWS the path is not even measured. Where it is taken, it agrees with the library product."""
    from glmtorch.fastpath import packing_supported

    if not packing_supported(torch.float32):
        pytest.skip("torch has no oneDNN packing here")
    offered = {}
    real = dispatch._measure
    monkeypatch.setattr(dispatch, "_measure", lambda paths, rows, *a: (offered.__setitem__(rows, set(paths)),
                                                                        real(paths, rows, *a))[1])
    layer = GemvLinear(64, 48)
    with torch.no_grad():
        layer(torch.randn(3, 64))
        layer(torch.randn(200, 64))
    assert "packed_per_call" not in offered[4] and "packed_per_call" in offered[256]
    blocks = kernels.takes_blocks(torch.float32, 48, 64)  # the kernels' blocks of 16 rows, the same way
    assert "blocks_per_call" not in offered[4] and ("blocks_per_call" in offered[256]) is blocks
    x = torch.randn(300, 64)
    for path in ["packed_per_call"] + ["blocks_per_call"] * blocks:
        monkeypatch.setenv("GLMTORCH_LINEAR_PATH", path)
        with torch.no_grad():
            assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
        assert layer.layout == "plain"  # the weight itself stays as it was


def test_the_fp32_row_order_is_measured_once_kept_and_can_be_forced(table, monkeypatch):
    """The first one- or two-row fp32 product measures how the kernels read fp32 weights (rows side by side or one
    at a time), kept in the table; a new process reads it back without measuring; GLMTORCH_FP32_ROW_ORDER forces
    it and a wrong value is refused."""
    if not kernels.available():
        pytest.skip("kernels not built")
    monkeypatch.delitem(dispatch._state, "fp32_rows", raising=False)
    measured = []
    monkeypatch.setattr(dispatch, "_time_fp32_row_orders", lambda: measured.append(1) or "one_at_a_time")
    layer = GemvLinear(64, 40)
    try:
        with torch.no_grad():
            layer(torch.randn(5, 64))  # more rows: not a question of row order
            assert measured == [] and "fp32_rows" not in dispatch._state
            x = torch.randn(1, 64)
            assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
        assert measured == [1] and dispatch._state["fp32_rows"] == "one_at_a_time"
        assert json.loads(table.read_text())["choices"]["gemv fp32 weight row order rows<=2"] == "one_at_a_time"
        dispatch._state.pop("fp32_rows")
        dispatch.forget()  # a new process
        assert dispatch.choose_fp32_row_order() == "one_at_a_time" and measured == [1]
        dispatch._state.pop("fp32_rows")
        monkeypatch.setenv("GLMTORCH_FP32_ROW_ORDER", "side_by_side")
        assert dispatch.choose_fp32_row_order() == "side_by_side" and measured == [1]
        dispatch._state.pop("fp32_rows")
        monkeypatch.setenv("GLMTORCH_FP32_ROW_ORDER", "diagonal")
        with pytest.raises(ValueError, match="GLMTORCH_FP32_ROW_ORDER='diagonal'"):
            dispatch.choose_fp32_row_order()
    finally:
        dispatch._state.pop("fp32_rows", None)
        torch.ops.glmtorch_kernels.set_fp32_row_order(0)


def test_the_table_lives_beside_its_own_kernels_build(monkeypatch):
    """Without GLMTORCH_DISPATCH_CACHE the table is in the folder of the kernels' build (named by a digest of their
    sources), so two glmtorch versions on one machine keep a table each."""
    monkeypatch.delenv("GLMTORCH_DISPATCH_CACHE", raising=False)
    dispatch.forget()
    try:
        path = dispatch.cache_file()
        assert path.endswith("dispatch.json")
        if kernels.available():
            assert os.path.basename(os.path.dirname(path)) == kernels.build_name()
    finally:
        dispatch.forget()
