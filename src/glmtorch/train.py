"""Training and fine-tuning: causal-LM loss on text, or on the assistant turns of chat data.

Data: plain .txt, or JSONL rows of {"text": ...} or {"messages": [...]}. Every row is tokenized (chat rows through
the chat template, with the loss only on assistant tokens), the token stream is packed into fixed windows, and
batches are drawn from a generator seeded by (seed, step), so a run resumed from a checkpoint sees exactly the
batches it would have seen: same seed, same steps, same numbers.

The loop: AdamW (no decay on norms and biases), linear warm-up then cosine decay, gradient clipping, gradient
accumulation, optional bf16 autocast and gradient checkpointing, periodic validation loss, checkpoints written
with `save_pretrained` (+ optimizer state and trainer state) that `resume` continues from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .chat import ChatFormatError, normalize_messages
from .losses import IGNORE_INDEX

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


class DataError(ValueError):
    """Training data that cannot be used, named by file and line."""


@dataclass
class TrainConfig:
    data: str
    out: str
    val_data: str | None = None  # else the last `val_fraction` of `data`
    val_fraction: float = 0.1
    block_size: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward (about 1.25x on 2 CPU cores, after ~1 min)
    eval_every: int = 200
    eval_windows: int = 64
    save_every: int = 0  # 0: only at the end
    stop_at: int | None = None  # pause after this step (with a checkpoint); `resume` continues the same schedule
    seed: int = 0
    progress: bool | None = None  # None: a bar on a terminal only

    def validate(self) -> None:
        for name in ("block_size", "batch_size", "grad_accum", "max_steps", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in (0, 1)")
        check_output_directory(self.out)


# -- data -----------------------------------------------------------------------------------------------------
def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs. A .txt file is one text row; JSONL rows are {"text"} or {"messages"}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if not content.strip():
        raise DataError(f"{path}: the file is empty")
    if not path.endswith((".jsonl", ".json")):
        return [(1, {"text": content})]
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ({"text", "messages"} & row.keys()):
            raise DataError(f"{path}:{number}: expected an object with 'text' or 'messages'")
        if "messages" in row:
            try:
                normalize_messages(row["messages"])
            except ChatFormatError as e:
                raise DataError(f"{path}:{number}: {e}") from None
            if not any(m.get("role") == "assistant" for m in row["messages"]):
                raise DataError(f"{path}:{number}: a conversation needs an assistant turn to learn from")
        elif not isinstance(row["text"], str):
            raise DataError(f"{path}:{number}: 'text' must be a string")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def split_rows(rows: list[tuple[int, dict]], val_fraction: float):
    """Hold out the end: the last fraction of a text file's characters, or of a JSONL file's rows."""
    if len(rows) == 1 and "text" in rows[0][1]:
        text = rows[0][1]["text"]
        cut = int(len(text) * (1 - val_fraction))
        return [(1, {"text": text[:cut]})], [(1, {"text": text[cut:]})]
    cut = max(1, int(len(rows) * (1 - val_fraction)))
    if cut >= len(rows):
        raise DataError("too few rows to hold out a validation set; pass --val-data")
    return rows[:cut], rows[cut:]


@dataclass
class TokenStream:
    ids: torch.Tensor  # (N,) every token
    labels: torch.Tensor  # (N,) the token where it is a target, else -100
    chars: torch.Tensor  # (N,) characters of text each target token stands for (0 for markup)

    def windows(self, block_size: int) -> "TokenStream":
        """Cut into (W, block_size) windows; the tail that does not fill a window is dropped."""
        n = (len(self.ids) // block_size) * block_size
        if n == 0:
            raise DataError(f"the data has {len(self.ids)} tokens, fewer than one block of {block_size}")
        shape = (-1, block_size)
        return TokenStream(self.ids[:n].view(shape), self.labels[:n].view(shape), self.chars[:n].view(shape))


def tokenize_rows(rows: list[tuple[int, dict]], tokenizer, path: str = "") -> TokenStream:
    ids: list[int] = []
    targets: list[bool] = []
    chars: list[int] = []
    eos = tokenizer.eos_token_id
    for number, row in rows:
        if "messages" in row:
            try:
                row_ids, row_targets, row_chars = tokenizer.encode_conversation(row["messages"], row.get("tools"))
            except (ChatFormatError, ValueError) as e:
                raise DataError(f"{path}:{number}: {e}") from None
        else:
            encoding = tokenizer.backend.encode(row["text"], add_special_tokens=False)
            row_ids = encoding.ids + ([eos] if eos is not None else [])
            row_targets = [True] * len(row_ids)
            row_chars = [e - s for s, e in encoding.offsets] + ([0] if eos is not None else [])
        ids += row_ids
        targets += row_targets
        chars += row_chars
    ids_t = torch.tensor(ids, dtype=torch.long)
    target_t = torch.tensor(targets, dtype=torch.bool)
    return TokenStream(ids_t, ids_t.masked_fill(~target_t, IGNORE_INDEX), torch.tensor(chars).masked_fill(~target_t, 0))


# -- schedule and optimizer -----------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def batch_indices(step: int, n_windows: int, count: int, seed: int) -> torch.Tensor:
    """The windows of one optimizer step: a function of (seed, step) only, so a resumed run matches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_windows, (count,), generator=g)


# -- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data: TokenStream, batch_size: int, max_windows: int | None = None) -> dict[str, float]:
    """Summed next-token loss over every target token; per token and per character of text."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens, total_chars = 0.0, 0, 0
    n = len(data.ids) if max_windows is None else min(len(data.ids), max_windows)
    device = model.device
    for start in range(0, n, batch_size):
        ids = data.ids[start:start + batch_size].to(device)
        labels = data.labels[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        targets = labels[:, 1:]
        total_nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
        total_tokens += int((targets != IGNORE_INDEX).sum())
        total_chars += int(data.chars[start:start + batch_size, 1:].sum())
    model.train(was_training)
    return {"loss": total_nll / max(1, total_tokens), "nats_per_char": total_nll / max(1, total_chars),
            "tokens": total_tokens, "chars": total_chars}


# -- the loop -------------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} and {"step", "val_loss", ...}
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def train(model, tokenizer, cfg: TrainConfig, state: TrainerState | None = None,
          optimizer_state: dict | None = None) -> TrainerState:
    """Train `model` in place and write checkpoints under cfg.out. Returns the final trainer state."""
    cfg.validate()
    rows = read_rows(cfg.data)
    if cfg.val_data:
        train_rows, val_rows = rows, read_rows(cfg.val_data)
    else:
        train_rows, val_rows = split_rows(rows, cfg.val_fraction)
    train_data = tokenize_rows(train_rows, tokenizer, cfg.data).windows(cfg.block_size)
    val_data = tokenize_rows(val_rows, tokenizer, cfg.val_data or cfg.data).windows(cfg.block_size)
    if int(tokenizer.vocab_size) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")

    torch.manual_seed(cfg.seed)
    state = state or TrainerState(config=asdict(cfg))
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    device = model.device
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="training", unit="step",
               disable=None if cfg.progress is None else not cfg.progress)
    started = time.perf_counter() - state.seconds
    end = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    while state.step < end:
        step = state.step
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = batch_indices(step, len(train_data.ids), cfg.batch_size * cfg.grad_accum, cfg.seed)
        # Normalise by the targets of the whole step so accumulation equals one big batch.
        n_targets = int((train_data.labels[windows][:, 1:] != IGNORE_INDEX).sum())
        step_loss = 0.0
        for micro in windows.view(cfg.grad_accum, cfg.batch_size):
            ids, labels = train_data.ids[micro].to(device), train_data.labels[micro].to(device)
            with autocast:
                loss = forward(ids, labels=labels, use_cache=False, num_items_in_batch=max(1, n_targets)).loss
            loss.backward()
            step_loss += loss.item()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.history.append({"step": state.step, "loss": step_loss, "lr": lr})
        bar.update()
        bar.set_postfix(loss=f"{step_loss:.3f}")
        last = state.step == end
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
            with autocast:
                metrics = evaluate(model, val_data, cfg.batch_size, cfg.eval_windows)
            state.history.append({"step": state.step, "val_loss": metrics["loss"],
                                  "val_nats_per_char": metrics["nats_per_char"]})
            bar.write(f"step {state.step}: train loss {step_loss:.4f}, val loss {metrics['loss']:.4f} "
                      f"({metrics['nats_per_char']:.4f} nats/char)")
        state.seconds = time.perf_counter() - started
        if (cfg.save_every and state.step % cfg.save_every == 0) or last:
            save_checkpoint(model, tokenizer, optimizer, state, cfg.out)
    bar.close()
    model.eval()
    return state


def save_checkpoint(model, tokenizer, optimizer, state: TrainerState, out: str) -> None:
    """Write the model, tokenizer, optimizer and trainer state into `out`, touching only files of our own.

    Everything is written to a sibling folder first and then moved in file by file, so an interruption leaves
    the previous checkpoint's files or the new ones, never a half-written file; files of an earlier save that this
    one does not write again (more shards then) are removed by name; nothing else in `out` is deleted.
    """
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_STATE))
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=1)
        plot_loss_curve(state, os.path.join(tmp, "loss_curve.png"))
        os.makedirs(out, exist_ok=True)
        written = set(os.listdir(tmp))
        # the trainer state goes last: a folder with it is a complete checkpoint of ours
        for name in sorted(written - {TRAINER_STATE}) + [TRAINER_STATE]:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        for name in os.listdir(out):
            if name not in written and _is_checkpoint_file(name):
                os.remove(os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_checkpoint_file(name: str) -> bool:
    """A file name that save_checkpoint writes (weights shards and their index, configs, tokenizer, states)."""
    return bool(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|config\.json|"
                             r"generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model|chat_template\.jinja|"
                             rf"{re.escape(OPTIMIZER_STATE)}|{re.escape(TRAINER_STATE)}|loss_curve\.png", name))


def check_output_directory(out: str) -> None:
    """`--out` must be new, empty, or a training checkpoint of ours (to be updated in place): a folder holding
    anything else is refused before training starts, so no one's files are ever overwritten or deleted."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out}: exists and is not a directory; choose a new directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, TRAINER_STATE)):
        raise DataError(f"--out {out}: the directory is not empty and is not a glmtorch training checkpoint (no "
                        f"{TRAINER_STATE}); choose a new or empty directory. Nothing in it was touched")


def load_checkpoint_state(directory: str) -> tuple[TrainerState, dict | None]:
    path = os.path.join(directory, TRAINER_STATE)
    if not os.path.isfile(path):
        raise DataError(f"{directory}: no {TRAINER_STATE}; it is not a glmtorch training checkpoint")
    with open(path, encoding="utf-8") as f:
        state = TrainerState(**json.load(f))
    opt_path = os.path.join(directory, OPTIMIZER_STATE)
    optimizer_state = torch.load(opt_path, weights_only=True) if os.path.isfile(opt_path) else None
    return state, optimizer_state


def plot_loss_curve(state: TrainerState, path: str) -> bool:
    """Train and validation loss against step, as a PNG (needs matplotlib; skipped quietly without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(h["step"], h["loss"]) for h in state.history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in state.history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        k = max(1, len(losses) // 100)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
