"""Generation: logits processors and samplers, the decode loop, stopping rules and streaming."""
