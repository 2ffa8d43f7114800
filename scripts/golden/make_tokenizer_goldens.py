#!/usr/bin/env python3
"""Byte-level BPE tokenizer fixtures from the Hugging Face `tokenizers` library.

Trains two small byte-level BPE tokenizers (no download needed) with the pipelines real
models ship, saves each tokenizer.json and the library's ids for a set of tricky strings:
  qwen2/  NFC normalizer, Split(Qwen2 regex, Isolated), ByteLevel(use_regex=False),
          ByteLevel decoder, <|endoftext|>/<|im_start|>/<|im_end|> special tokens
  gpt2/   ByteLevel(add_prefix_space=False, use_regex=True) (GPT-2 / DeepSeek style),
          a TemplateProcessing post-processor adding a BOS token, an lstrip/rstrip token
Usage: make_tokenizer_goldens.py OUT_DIR   (writes OUT_DIR/{qwen2,gpt2}/{tokenizer.json,cases.json})
"""
import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import AddedToken

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026; we've got 12345 tokens!",
    "Mixture-of-Experts models route each token to k of E experts; LoRA adds B·A.",
    "def forward(self, x):\n    return self.down(F.silu(self.gate(x)) * self.up(x))\n",
    "Größere Modelle, naïve café, déjà vu — «quotes» and “smart quotes”.",
    "日本語のテキストも少し。中文也有一些。한국어 문장도 있습니다.",
    "Emoji 🙂🚀🔥 and symbols ∑∫√ ≤ ≥ ≠ ±; tabs\tand\r\nnewlines\n\n\nspaces     here.",
    "I'LL SHOUT, you'd whisper; they're here, she's gone, we'm odd.",
    "Numbers: 3.14159, 2,718, 1e-5, 0x1F, 007, ٣٤٥ (Arabic-Indic), ⅷ.",
] * 20

CASES = [
    "Hello world",
    "Hello  world   with    runs of spaces ",
    " leading space and trailing space ",
    "It's we've they'RE I'll you'd I'M",
    "numbers 1234567890 and 3.14 and ٣٤٥ and ⅷ",
    "tabs\tand\nnewlines\r\n\n\n  indented\n",
    "naïve café déjà vu Größe",
    "nai\u0308ve (decomposed, NFC folds it)",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀🔥 and ∑∫√ ≤≥",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|endoftext|>",
    "unseen words: zyxwvut qqqq Ωμέγα",
    "",
    "   ",
    "a",
    "def f(x):\n    return x * 2  # comment\n",
]


def build(kind):
    tok = Tokenizer(models.BPE())
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<s>", "</s>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "gpt2":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        tok.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    return tok


def main():
    out = sys.argv[1]
    for kind in ["qwen2", "gpt2"]:
        tok = build(kind)
        d = os.path.join(out, kind)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        cases = list(CASES)
        if kind == "gpt2":
            cases += ["fill the <mask> here", "a<mask>b", "<s>explicit bos</s>"]
        rows = []
        for text in cases:
            ids = tok.encode(text, add_special_tokens=True).ids
            ids_plain = tok.encode(text, add_special_tokens=False).ids
            rows.append({
                "text": text,
                "ids": ids,
                "ids_no_special": ids_plain,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            })
        with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizers_version": __import__("tokenizers").__version__, "cases": rows}, f,
                      ensure_ascii=False, indent=1)
        print(kind, "vocab", tok.get_vocab_size(), "cases", len(rows))


if __name__ == "__main__":
    main()
