"""Copy a trained checkpoint into the package as the demo model: fp32 weights (11.8 MB), tokenizer, chat template,
generation_config.json, and the training figures (trainer_state.json summary, loss curve).

    python scripts/export_demo.py CHECKPOINT src/glmtorch/demo_model
"""

import json
import os
import shutil
import sys

import torch

from glmtorch import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def main(src: str, dst: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)  # fp32: most CPUs lack fast bf16
    tokenizer = AutoTokenizer.from_pretrained(src)
    stops = sorted(tokenizer.stop_token_ids())
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, max_new_tokens=128,
        max_length=None, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    with open(os.path.join(src, "trainer_state.json")) as f:
        state = json.load(f)
    val = [h for h in state["history"] if "val_loss" in h]
    summary = {"parameters": model.num_parameters(), "steps": state["step"], "train_minutes": state["seconds"] / 60,
               "final_val_loss_per_token": val[-1]["val_loss"], "final_val_nats_per_char": val[-1]["val_nats_per_char"],
               "val_curve": val, "config": state["config"]}
    with open(os.path.join(dst, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.isfile(os.path.join(src, "loss_curve.png")):
        shutil.copy(os.path.join(src, "loss_curve.png"), os.path.join(dst, "loss_curve.png"))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("val_curve", "config")}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
