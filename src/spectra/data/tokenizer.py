"""The locally trained byte-level BPE tokenizer, its ChatML chat template, and `load_tokenizer`.

Special tokens (ids fixed by training order): 0 `<|endoftext|>` (padding), 1 `<|im_start|>`,
2 `<|im_end|>` (end of every turn, so also `eos_token`: generation stops after a reply).
No normaliser and a byte-level pre-tokeniser/decoder: decode(encode(text)) == text for any text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .corpus import BUNDLED_DIR

logger = logging.getLogger(__name__)

BUNDLED_TOKENIZER_DIR = BUNDLED_DIR / "tokenizer"
PAD_TOKEN, BOS_TURN, EOS_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TURN, EOS_TURN)
DEFAULT_VOCAB_SIZE = 8192

# ChatML as in SmolLM2-Instruct, minus its default system prompt (every token counts in tiny
# runs). `{% generation %}` marks what the assistant must learn to produce: its content and
# the closing <|im_end|>, so `return_assistant_tokens_mask=True` yields exactly those tokens.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 2048):
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer.

    Deterministic for the same texts in the same order (the BPE trainer breaks count ties by
    pair order). Returns a `PreTrainedTokenizerFast` with the ChatML template set.
    """
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps round-trips exact (no space is invented at the start).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TURN,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # never alter decoded text
    )


def load_tokenizer(name: str = "bundled"):
    """'bundled' -> the tokenizer shipped in the package; else `AutoTokenizer.from_pretrained(name)`.

    A hub/local tokenizer whose chat template is missing or has no `{% generation %}` markers
    (needed for assistant-only loss) gets CHATML_TEMPLATE instead, with a log line saying so.
    A missing pad token falls back to eos. Raises OSError (one line, naming `name`) on failure.
    """
    path = str(BUNDLED_TOKENIZER_DIR) if name == "bundled" else name
    if name == "bundled" and not (BUNDLED_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise OSError(f"bundled tokenizer not found: {path} (build it with `python -m spectra.data.build_corpus`)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load tokenizer {path!r}: {first_line}") from None
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if not template or "generation" not in template:
        logger.info("tokenizer %s: chat template %s; using the ChatML template", path,
                    "missing" if not template else "has no {% generation %} markers")
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

