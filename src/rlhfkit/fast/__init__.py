"""CPU (and GPU) speed tricks, each the same maths as the plain computation (tested), kept out of the algorithms:

- attention.py: the SDPA kernel for trainers' forwards (math at short lengths on the CPU) and SDPA's own
  grouped-query attention instead of transformers' `repeat_kv` copies
- layers.py:    per-block gradient checkpointing and torch.compile wrappers, and the KV-cache keyword of the
                installed transformers
- prefixes.py:  shared prefixes: rows that start alike run their common start once into a KV cache (`Prefix`,
                `decode_on_prefixes`)

The algorithms reach them through `rlhfkit.forward` (the one forward path, which builds the prefixes), the
trainers' model set-up (`training.for_training`) and the rollout engine.
"""
