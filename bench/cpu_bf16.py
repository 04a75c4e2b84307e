"""Why a smoke run trains in fp32 on a CPU without bf16 instructions: one BERT-base training
step (forward, masked-LM loss, backward) in fp32 against bf16, side by side in one process.

A smoke run shrinks BERT-base to 2 CPU workers of micro-batch 2 at sequence length 128; each
worker computes on one thread, as here. bf16 is timed two ways: weights in bf16 (what
DeepSpeed's bf16 mode trains) and fp32 weights under autocast (DDP's bf16). On a CPU without
AVX-512 BF16 or AMX (oneDNN's check, `cpu_has_bf16`), torch emulates bf16 matmuls.

    python bench/cpu_bf16.py            # writes bench/results/cpu_bf16.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from orchestrator.smoketest.shrink import cpu_has_bf16

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ_LEN, REPEATS = 2, 128, 2


def step_seconds(model: torch.nn.Module, autocast: bool) -> float:
    """The fastest of REPEATS steps (the first one included: each is tens of seconds)."""
    tokens = torch.randint(0, 30522, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, attn_implementation="sdpa")  # BERT-base
    fp32 = BertForMaskedLM(config)
    seconds = {
        "fp32": step_seconds(fp32, autocast=False),
        "bf16_autocast": step_seconds(fp32, autocast=True),
        "bf16_weights": step_seconds(BertForMaskedLM(config).to(torch.bfloat16), autocast=False),
    }
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_bf16": cpu_has_bf16(),
        "step": f"BERT-base MLM, batch {BATCH}, sequence {SEQ_LEN}, 1 thread",
        "seconds_per_step": {k: round(v, 2) for k, v in seconds.items()},
        "slowdown_vs_fp32": {k: round(v / seconds["fp32"], 1) for k, v in seconds.items()},
    }
    out = ROOT / "bench" / "results" / "cpu_bf16.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
