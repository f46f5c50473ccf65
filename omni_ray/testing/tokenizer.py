"""A byte-level BPE tokenizer trained locally on the text the package ships.

It stands in for a real model's tokenizer in the tiny checkpoints: saved as
``tokenizer.json`` + ``tokenizer_config.json`` (with a chat template), it loads through
``transformers.AutoTokenizer`` exactly as a hub tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {"chatml": (CHATML_TEMPLATE, "<|im_end|>", None),
             "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>")}

# the tokens a real model's chat template writes besides SPECIAL_TOKENS: (special ones, plain ones).
# Plain tokens are single tokens that decode as text (skip_special_tokens keeps them), as in the
# real tokenizers: Qwen's <tool_call> (151657) ... </think> (151668); Llama 3.1's <|python_tag|>
# (128010) and <|eom_id|> (128008) are special.
TEMPLATE_TOKENS = {
    "chatml": ((), ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")),
    "llama3": (("<|python_tag|>", "<|eom_id|>"), ()),
}
TEMPLATE_DIR = Path(__file__).parent / "templates"


def real_template(name: str) -> str:
    """A real model's chat template (``templates/<name>.jinja``: qwen2_5, qwen3, llama3_1)."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text().removesuffix("\n")


def train_tokenizer(vocab_size: int = 1024, extra_special: tuple[str, ...] = (),
                    plain_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """``extra_special``: more special tokens (a multimodal model's placeholders), given ids right
    after ``SPECIAL_TOKENS`` (the ids of the base tokens and of the BPE vocabulary's start move up);
    ``plain_tokens``: added tokens after those that are not special (they decode as text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special) + list(plain_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(CORPUS)], trainer)
    if plain_tokens:
        data = json.loads(tok.to_str())
        for t in data["added_tokens"]:
            if t["content"] in plain_tokens:
                t["special"] = False
        tok = Tokenizer.from_str(json.dumps(data))
    return tok


def fill_vocab(tok: Tokenizer, size: int) -> Tokenizer:
    """``tok`` with its BPE vocabulary padded to ``size`` ids by filler words (" w1234"): no merge
    makes them, so encoding is unchanged, but every id a model of ``size`` logits can sample decodes
    to text, as with a real tokenizer (a random-weight model at a real vocabulary size then
    streams text for each token, not mostly empty deltas)."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data["added_tokens"]}
    i = n = tok.get_vocab_size()
    while n < size:
        word = f"\u0120w{i}"                      # byte-level "Ġ" = a leading space
        i += 1
        if word not in taken:
            vocab[word] = n
            n += 1
    return Tokenizer.from_str(json.dumps(data))


def save_tokenizer(out: Path, template: str = "chatml", vocab_size: int = 1024, fill_to: int | None = None,
                   extra_special: tuple[str, ...] = (), named_tokens: dict[str, str] | None = None,
                   chat_template: str | None = None, template_tokens: bool = False) -> dict:
    """Write tokenizer files into ``out``; returns ids of the special tokens. ``fill_to``: pad the
    vocabulary to the model's size (``fill_vocab``). ``extra_special``: more special tokens;
    ``named_tokens``: attribute name -> token (e.g. ``image_token``), written as the tokenizer's
    model-specific ``extra_special_tokens`` so that ``tokenizer.image_token(_id)`` exist;
    ``chat_template``: replaces the template's own; ``template_tokens``: add the family's
    ``TEMPLATE_TOKENS`` (what a real template with tools writes)."""
    special, plain = TEMPLATE_TOKENS[template] if template_tokens else ((), ())
    extra_special = tuple(extra_special) + special
    tok = train_tokenizer(vocab_size, extra_special, plain)
    if fill_to and fill_to > tok.get_vocab_size():
        tok = fill_vocab(tok, fill_to)
    tok.save(str(out / "tokenizer.json"))
    default_template, eos, bos = TEMPLATES[template]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "eos_token": eos,
        "pad_token": "<|endoftext|>",
        "bos_token": bos,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template or default_template,
    }
    if named_tokens:
        cfg["extra_special_tokens"] = dict(named_tokens)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("eos_token", "pad_token", "bos_token") if cfg[k]}, indent=2))
    return ({t: tok.token_to_id(t) for t in SPECIAL_TOKENS + list(extra_special) + list(plain)}
            | {"vocab_len": tok.get_vocab_size()})
