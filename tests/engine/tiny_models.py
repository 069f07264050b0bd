"""Tiny transformer teachers, tokenizers and text datasets built offline (tests, benchmarks, examples)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# Words of a synthetic sentiment-like task: the label is the class whose cue words dominate a sentence.
CUES: tuple[tuple[str, ...], ...] = (
    ("good", "great", "fine", "happy", "bright", "calm"),
    ("bad", "awful", "poor", "sad", "dark", "angry"),
    ("odd", "strange", "weird", "curious", "rare", "novel"),
)
FILLER: tuple[str, ...] = tuple(
    [
        "the",
        "a",
        "this",
        "that",
        "it",
        "was",
        "is",
        "very",
        "quite",
        "so",
        "rather",
        "and",
        "but",
        "or",
        "day",
        "film",
        "food",
        "trip",
        "room",
        "song",
        "book",
        "place",
        "team",
        "view",
        "with",
        "of",
        "in",
        "on",
        "at",
        "for",
        "to",
        "from",
        "by",
        "we",
        "they",
        "you",
        "all",
        "some",
    ]
)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    """Every word the synthetic data uses."""
    return sorted({*FILLER, *(word for cue in CUES for word in cue)})


def make_bert_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over the synthetic vocabulary (built offline)."""
    vocab = {token: i for i, token in enumerate([*BERT_SPECIALS, *vocabulary()])}
    return BertTokenizer(vocab=vocab)


CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
# Whitespace-separated so the word-level tokenizer splits it; renders conversations incrementally.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_gpt2_tokenizer(*, chat: bool = False, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level GPT-2-style tokenizer (one end-of-text token serving as eos/bos/pad/unk).

    chat: role tokens in the vocabulary and CHAT_TEMPLATE as its chat template.
    """
    words = [*vocabulary(), *extra_words, "."] + (list(CHAT_TOKENS) if chat else [])
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def bert_config(vocab_size: int, *, layers: int = 4, hidden: int = 64, heads: int = 4) -> BertConfig:
    """A small BERT config (intermediate = 4 x hidden)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )


def save_tiny_bert(
    directory: Path,
    *,
    head: str = "sequence-classification",
    num_labels: int = 3,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-init BERT + tokenizer, save_pretrained; head: sequence-classification | masked-lm | none."""
    torch.manual_seed(seed)
    tokenizer = make_bert_tokenizer()
    config = bert_config(len(tokenizer), layers=layers, hidden=hidden, heads=heads)
    model: PreTrainedModel
    if head == "sequence-classification":
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    elif head == "masked-lm":
        model = BertForMaskedLM(config)
    elif head == "none":
        model = BertModel(config)
    else:
        raise ValueError(f"unknown head '{head}'")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_tiny_gpt2(
    directory: Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    chat: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> PreTrainedModel:
    """A random-init GPT-2 LM + word-level tokenizer (with a chat template when `chat`), save_pretrained."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or make_gpt2_tokenizer(chat=chat)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def classification_rows(count: int, *, seed: int = 0, noise: float = 0.1) -> list[dict[str, object]]:
    """Sentences of filler and cue words; label = the class with most cues; `noise` of labels flipped."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(count):
        label = rng.randrange(len(CUES))
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        # A distracting cue of another class, never more than the true class's cues.
        if rng.random() < 0.5:
            other = rng.choice([c for c in range(len(CUES)) if c != label])
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[other]))
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        if rng.random() < noise:
            label = rng.choice([c for c in range(len(CUES)) if c != label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def lm_rows(count: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Short sentences with regular structure (something for a language model to learn)."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(count):
        cue = rng.choice(CUES)
        words = ["the", rng.choice(["film", "food", "trip", "room", "song", "book"]), "was", "very"]
        words += [rng.choice(cue), "and", rng.choice(cue), "."]
        rows.append({"text": " ".join(words)})
    return rows


def chat_rows(count: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Conversations: the user names a cue class by one cue word, the assistant answers with two more."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(count):
        cue = rng.choice(CUES)
        messages = [{"role": "user", "content": f"the {rng.choice(FILLER[14:24])} was {rng.choice(cue)}"}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "you all so calm"})
        messages.append({"role": "assistant", "content": f"very {rng.choice(cue)} and {rng.choice(cue)} ."})
        rows.append({"messages": messages})
    return rows


def prompt_completion_rows(count: int, *, seed: int = 0) -> list[dict[str, object]]:
    """Instruction rows: a prompt with a cue word, a completion continuing in the same cue class."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(count):
        cue = rng.choice(CUES)
        rows.append(
            {
                "prompt": f"the {rng.choice(FILLER[14:24])} was {rng.choice(cue)}",
                "completion": f"and {rng.choice(cue)} and {rng.choice(cue)} .",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_tiny_gpt2(
    directory: Path,
    texts: list[str],
    *,
    chat: bool = False,
    layers: int = 2,
    hidden: int = 48,
    heads: int = 4,
    steps: int = 150,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny GPT-2 teacher trained with cross-entropy on `texts` (each ends with eos), save_pretrained."""
    model = save_tiny_gpt2(directory, layers=layers, hidden=hidden, heads=heads, seed=seed, chat=chat)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    eos = tokenizer.eos_token or ""
    encoded = tokenizer([t + " " + eos for t in texts], padding="longest", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, ids.shape[0], (batch_size,), generator=generator)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    return model
