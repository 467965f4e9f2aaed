"""A tiny random LlamaForCausalLM and a tiny word-level tokenizer, built offline.

Reusable by any test (no network, no downloads):

    from _tiny_model import make_tiny_tokenizer, make_tiny_llama, save_tiny_model_dir

    path = save_tiny_model_dir(tmp_path / "m", seed=0)     # model + tokenizer, safetensors
    tok = make_tiny_tokenizer()                             # PreTrainedTokenizerFast
    model = make_tiny_llama(tok, seed=1)                    # random weights, eval mode

(pytest's default "prepend" import mode puts tests/ on sys.path, so `from _tiny_model
import ...` works; `from tests._tiny_model import ...` works when the repo root is on it.)

The tokenizer is word level (whitespace split). Special tokens: ``<bos>``, ``<eos>``,
``<pad>``, ``<unk>``; pad is a distinct token (not eos). Its chat template renders

    <bos> user : {content} assistant :            (with add_generation_prompt=True)

and a finished assistant turn as ``... assistant : {content} <eos>``.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = (
    "user assistant system : . , ? ! a an the is are of to and or not list name give "
    "me three two one four five items colors animals fruits red blue green yellow cat "
    "dog fish bird apple pear plum fig please sorted order any in yes no"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = True, padding_side: str = "right"):
    """A PreTrainedTokenizerFast over SPECIAL_TOKENS + WORDS (vocab size len of both)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(tokenizer=None, seed: int = 0, **config_overrides):
    """A random LlamaForCausalLM (hidden 32, 2 layers, 4 heads) in float32, eval mode.

    `initializer_range` defaults to 0.2 (HF's 0.02 gives almost uniform next-token
    distributions; 0.2 makes samples differ visibly and EOS reachable).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def save_tiny_model_dir(
    path,
    seed: int = 0,
    chat_template: bool = True,
    save_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Build and save_pretrained (safetensors) a tiny model and tokenizer into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(chat_template=chat_template)
    model = make_tiny_llama(tok, seed=seed, **config_overrides)
    model.save_pretrained(path, safe_serialization=True)
    if save_tokenizer:
        tok.save_pretrained(path)
    return path


try:  # a fixture tests can import: `from _tiny_model import torch_single_thread  # noqa: F401`
    import pytest

    @pytest.fixture(autouse=True, scope="module")
    def torch_single_thread():
        """One intra-op thread for the importing module's tests, restored afterwards.

        Tiny tensors on a shared, oversubscribed CPU run 10x faster single-threaded.
        """
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

except ImportError:  # pragma: no cover - pytest absent (helper used outside tests)
    pass
