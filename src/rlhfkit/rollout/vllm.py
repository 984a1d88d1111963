"""VLLMEngine: sampling with vLLM (Kwon et al. 2023, PagedAttention) in this process, beside the trainer.

One engine per process, colocated with the trainer as TRL's `vllm_mode="colocate"` and veRL's hybrid engine run it:
`vllm.LLM` in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), tensor parallel size 1; under torchrun each process
runs its own engine on its own share of the prompts (vLLM's `external_launcher`). Its life, top to bottom:
  1. start: a directory with the policy's config and tokenizer, no weights (`load_format="dummy"`); vLLM builds the
     model from the config, and the first `sync` loads the real weights
  2. `sync(model)`: the trainer's current weights go into the engine, one tensor at a time (a sharded FSDP2
     parameter is gathered whole just for its turn; a LoRA layer's weight is merged with its adapter on the fly),
     through the worker's `reload_weights`, vLLM's layerwise reload, which also redoes the platform's weight
     processing (the CPU backend repacks Linear weights after loading, so a plain `load_weights` works only once).
     Then the prefix cache is cleared: it holds keys and values of the old weights
  3. `generate`: one request per row (i, j), seeded from (seed, i, j) as `HFEngine` seeds its rows, so a sample does
     not depend on the batch; the sampled token's log-probability comes back with it (`Samples.logprobs`)
  4. on CUDA, between rollouts it sleeps (`LLM.sleep(level=2)`: KV cache and weights freed) and wakes for the next
     sync, so the trainer has the memory; the CPU backend has no sleep mode.

Log-probabilities are vLLM's "processed_logprobs": of the distribution it sampled from, after temperature and
top-p (renormalised over the nucleus). The trainer's log-probs are of the whole vocabulary at the temperature, so
with top-p < 1 the two differ by the nucleus's mass, log P(nucleus) ≤ 0 per token (docs/algorithms/ppo.md,
"Rollouts from vLLM"). Departures from TRL's colocate mode: per-row seeds, and no tensor parallelism.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from rlhfkit import RlhfkitError, UsageError, models
from rlhfkit.data import chat
from rlhfkit.data.formats import Messages
from rlhfkit.rollout import Samples, SamplingParams, assemble, check_fits

DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


class SyncError(RlhfkitError):
    """Loading the trainer's weights into the engine failed."""


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """vLLM's per-request seed for row (i, j): numpy's SeedSequence mixes (seed, i, j), as `rollout.row_rng` does."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def checkpoint_names(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, str]]:
    """(checkpoint name, key) of each tensor `hf_weights` yields from the state dict of `models.base_model`: a
    peft model's names without `.base_layer`, its LoRA matrices left out."""
    for key in state:
        if "lora_" not in key:
            yield key.replace(".base_layer.", "."), key


def hf_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in Hugging Face checkpoint names, one tensor at a time, as vLLM's loaders read a checkpoint.

    A peft model's LoRA layers yield base + B·A·scale (peft's `get_delta_weight`), computed here without merging
    into the trained weights; an FSDP2-sharded parameter (a DTensor) is gathered whole for its turn only, so every
    process must walk the same names in the same order (they do: one model)."""
    from torch.distributed.tensor import DTensor

    base = models.base_model(model)
    state = base.state_dict()
    for name, key in checkpoint_names(state):
        tensor = state[key]
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if key != name and key.endswith(".weight"):  # a LoRA layer's base weight
            module = base.get_submodule(key.rsplit(".base_layer.", 1)[0])
            if not module.merged:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                tensor = tensor + (delta.full_tensor() if isinstance(delta, DTensor) else delta)
        yield name, tensor.detach()


def shapes(model) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of what `hf_weights` yields (a DTensor's shape is the whole tensor's)."""
    state = models.base_model(model).state_dict()
    return {name: tuple(state[key].shape) for name, key in checkpoint_names(state)}


class VLLMEngine:
    """Batched sampling with vLLM, colocated with the trainer (see the module docstring).

    model: the policy (a transformers causal LM or a peft model around one) whose weights `sync` loads.
    precision: "no", "bf16" or "fp16", as `models.mixed_precision` returns; vLLM runs in that dtype.
    gpu_memory_utilization: the share of the GPU vLLM takes for weights and KV cache (CUDA only); on the CPU
    the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (set here to 2 unless given). sync_timeout: seconds a sync may
    take before the process stops with an error naming the parameter it was on (a stalled gather would
    otherwise hang every process silently)."""

    samples_with_model = False

    def __init__(self, model, tokenizer, precision: str = "no", gpu_memory_utilization: float = 0.3,
                 stop_ids: Iterable[int] | None = None, seed: int = 0, progress: bool = False,
                 max_model_len: int | None = None, sync_timeout: float = 600.0):
        config = models.base_model(model).config
        self.tok = tokenizer
        self.stop_ids = sorted(chat.end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.progress = progress
        self.sync_timeout = sync_timeout
        self.cuda = torch.cuda.is_available()
        self.max_model_len = max_model_len or min(getattr(config, "max_position_embeddings", 4096), 4096)
        # 1. the policy's config and tokenizer, no weights: the first sync loads them
        self.dir = tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-")
        config.save_pretrained(self.dir.name)
        tokenizer.save_pretrained(self.dir.name)
        self.llm = start(self.dir.name, DTYPES[precision], self.max_model_len, gpu_memory_utilization, seed,
                         self.cuda)
        self.asleep = False
        self.broken: str | None = None  # why the engine cannot be used any more (a sync failed half-way)
        self.shapes = shapes(model)  # what the engine was built for: each sync must bring exactly these
        self.sync(model)

    def encode_prompt(self, messages: Messages) -> list[int]:
        return chat.encode_prompt(self.tok, messages)

    def check_fits(self, lengths: list[int], max_new_tokens: int) -> None:
        check_fits(lengths, max_new_tokens, self.max_model_len)

    def sync(self, model) -> float:
        """Load `model`'s current weights into the engine (step 2 of the module docstring); seconds taken."""
        start_time = time.perf_counter()
        self._check_usable()
        have = shapes(model)
        mismatch = next(((name, have.get(name), self.shapes.get(name)) for name in [*have, *self.shapes]
                         if have.get(name) != self.shapes.get(name)), None)
        if mismatch:  # checked before vLLM sees a tensor: a reload that fails half-way leaves the engine unusable
            name, got, want = mismatch
            raise SyncError(f"cannot sync the weights into vLLM: parameter {name} is {got or 'missing'} in the "
                            f"model and {want or 'unknown'} in the engine, which was built for another model")
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        current = ["(before the first parameter)"]

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in hf_weights(model):
                current[0] = name
                yield name, tensor

        def stalled() -> None:
            print(f"error: the weight sync into vLLM stalled for {self.sync_timeout:.0f} s at parameter "
                  f"{current[0]}; stopping", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread is stuck in a gather or in vLLM: nothing else would end it

        watchdog = threading.Timer(self.sync_timeout, stalled)
        watchdog.daemon = True
        watchdog.start()
        try:
            with torch.no_grad():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        except Exception as e:  # vLLM raises what its loader met; say where
            self.broken = f"the weight sync failed at parameter {current[0]}: {type(e).__name__}: {e}"
            raise SyncError(f"{self.broken} (the engine is unusable now; start a new one)") from e
        finally:
            watchdog.cancel()
        self.llm.reset_prefix_cache()  # its keys and values came from the old weights
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return time.perf_counter() - start_time

    def _check_usable(self) -> None:
        if self.broken:
            raise SyncError(f"this vLLM engine is unusable: {self.broken}")

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next sync (CUDA; nothing on the CPU)."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def generate(self, prompts: list[Messages], params: SamplingParams) -> Samples:
        """n samples per prompt; row i·n + j is sample j of prompt i (see `Samples`), with `logprobs`."""
        from vllm import SamplingParams as VSamplingParams

        if not prompts:
            raise ValueError("generate needs at least one prompt")
        self._check_usable()
        if self.asleep:
            raise RuntimeError("the vLLM engine sleeps: sync the weights first")
        encoded = [self.encode_prompt(m) for m in prompts]
        self.check_fits([len(e) for e in encoded], params.max_new_tokens)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        requests = [{"prompt_token_ids": encoded[i]} for i, _ in rows]
        greedy = params.temperature == 0
        sampling = [VSamplingParams(n=1, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                                    max_tokens=params.max_new_tokens, stop_token_ids=self.stop_ids,
                                    seed=None if greedy else row_seed(params.seed, params.first_prompt + i, j),
                                    logprobs=0, detokenize=False, skip_special_tokens=False)
                    for i, j in rows]
        outputs = self.llm.generate(requests, sampling, use_tqdm=self.progress)
        responses, finished, logprobs = [], [], []
        for out in outputs:
            done = out.outputs[0]
            ids = list(done.token_ids)
            responses.append(ids)
            finished.append(bool(ids) and ids[-1] in self.stop_ids)
            # logprobs=0: each position holds the sampled token's entry (and no others)
            logprobs.append([pos[t].logprob for pos, t in zip(done.logprobs, ids)])
        return assemble(self.tok, self.pad_id, encoded, rows, responses, finished, params.n, logprobs)


def start(path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float, seed: int, cuda: bool):
    """`vllm.LLM` in this process, on the model directory `path` (config and tokenizer, no weights)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: sync hands it tensors, not pickles
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO and per-sync warnings would bury the progress bars
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # "auto" would pin the trainer's threads too
    # vLLM's CPU worker lowers the process's torch threads for serving and sets oneDNN's fp32 matmul precision;
    # the trainer in this process keeps its own
    threads, matmul = torch.get_num_threads(), torch.backends.mkldnn.matmul.fp32_precision
    try:
        from vllm import LLM
    except ImportError as e:
        raise UsageError(f"--engine vllm: vLLM does not import here ({e}); scripts/setup --with vllm") from None
    kwargs = dict(model=path, tokenizer=path, load_format="dummy", dtype=dtype, max_model_len=max_model_len, seed=seed,
                  logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                  enforce_eager=not cuda)  # CUDA graphs pay off on a GPU; on the CPU compiling costs minutes
    if not cuda:
        # a prompt prefilled in chunks has its sampled token thrown away, and vLLM 0.32 then rewinds the request's
        # seeded generator with `set_offset`, which a CPU generator does not have ("CPU Generator does not use
        # offset"): whole prompts only
        kwargs.update(enable_chunked_prefill=False)
    if cuda:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # data-parallel trainer processes (torchrun): each runs its own engine on its own prompts; vLLM joins the
        # process group it finds instead of starting one of its own (TRL's colocate mode does the same)
        kwargs.update(distributed_executor_backend="external_launcher")
    llm = LLM(**kwargs)
    torch.set_num_threads(threads)
    torch.backends.mkldnn.matmul.fp32_precision = matmul
    return llm

