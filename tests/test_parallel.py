"""Tensor parallelism: 2 gloo processes on the CPU give the single-process logits and tokens."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import glmtorch
from conftest import CONFIGS, make_hf_model, rel_err, save_hf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, path, results, quantize=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        model = glmtorch.AutoModelForCausalLM.from_pretrained(path, tp_size=world, quantize=quantize)
        ids = torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
        sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)  # no seed: rank 0 decides
        nbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        results[rank] = {"logits": logits, "tokens": tokens, "sampled": sampled, "bytes": nbytes}
    except Exception as e:  # noqa: BLE001 - reported to the test
        results[rank] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_parallel(path, world=2, timeout=240, quantize=None):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, path, results, quantize)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "tensor-parallel workers hung"
    return dict(results)


@pytest.mark.slow
@pytest.mark.parametrize("config_name,arch", [("gqa", "Glm"), ("mqa_wide_heads", "Glm"), ("tied_narrow_heads", "Glm"),
                                              ("gqa", "Glm4")])  # Glm4: GLM-4-0414's sandwich norms
def test_two_ranks_match_one_process(tmp_path, config_name, arch):
    ref = make_hf_model(f"{arch}ForCausalLM", **dict(CONFIGS[config_name], intermediate_size=96))
    path = save_hf(ref, tmp_path / config_name)
    single = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    assert type(single).__name__ == f"{arch}ForCausalLM"
    ids = torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = single(ids).logits
    expected_tokens = single.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in single.parameters()}.values())
    results = run_parallel(path)
    for rank in (0, 1):
        assert "error" not in results[rank], results[rank]
        assert rel_err(results[rank]["logits"], expected) < 1e-5
        assert torch.equal(results[rank]["tokens"], expected_tokens)
        assert results[rank]["bytes"] < 0.62 * total, (results[rank]["bytes"], total)
    assert torch.equal(results[0]["sampled"], results[1]["sampled"])


@pytest.mark.slow
@pytest.mark.parametrize("mode,tolerance", [("int4", 1e-5), ("int8", 2e-2)])
def test_quantized_shards(tmp_path, mode, tolerance):
    """Each rank quantizes its own shard: int4's groups of 32 inputs fall where the single process's do (the shard
    boundaries are multiples of 32), so the logits match it; int8's per-row scales of a row-split matrix are
    computed over each rank's half of the row, within quantization error of the single process's."""
    ref = make_hf_model(**dict(CONFIGS["gqa"], intermediate_size=128))
    path = save_hf(ref, tmp_path / "q")
    single = glmtorch.AutoModelForCausalLM.from_pretrained(path, quantize=mode)
    ids = torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = single(ids).logits
    results = run_parallel(path, quantize=mode)
    for rank in (0, 1):
        assert "error" not in results[rank], results[rank]
        assert rel_err(results[rank]["logits"], expected) < tolerance
    assert torch.equal(results[0]["tokens"], results[1]["tokens"])


@pytest.mark.slow
def test_indivisible_heads_fail_on_every_rank_without_hanging(tmp_path):
    ref = make_hf_model(**CONFIGS["six_heads_gelu"])  # 6 heads, 3 KV heads: not splittable across 4 ranks
    path = save_hf(ref, tmp_path / "six")
    results = run_parallel(path, world=4, timeout=180)
    assert len(results) == 4
    for rank in range(4):
        assert "cannot split this model" in results[rank].get("error", ""), results[rank]


@pytest.mark.slow
def test_generate_command_under_torchrun(tmp_path, chat_checkpoint):
    import subprocess
    import sys

    _, path = chat_checkpoint
    args = ["generate", str(path), "--prompt", "Hello", "--greedy", "--max-new-tokens", "6", "--dtype", "float32",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "glmtorch", *args], capture_output=True, text=True, timeout=120,
                            env=env)
    assert single.returncode == 0, single.stderr
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "glmtorch", *args],
                              capture_output=True, text=True, timeout=240, env=env)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    assert parallel.stdout == single.stdout  # rank 0 alone prints, the same reply


@pytest.mark.slow
def test_serve_under_torchrun(chat_checkpoint):
    """`torchrun --nproc-per-node 2 -m glmtorch serve`: rank 0 serves and schedules, rank 1 runs the same steps on
    its shard; replies (two at once, so a batch decodes) equal the single process's greedy ones."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    prompts = ["Hello there", "The quick brown fox"]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
        expected.append(tokenizer.decode(out[0, ids.shape[1]:]))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "glmtorch", "serve", str(path), "--port",
                               str(port), "--max-num-seqs", "4", "--dtype", "float32", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the tensor-parallel server did not come up"
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "prompt": prompts, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
        assert [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])] == expected
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
