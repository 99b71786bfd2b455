"""The toy world's prompt grammar and the word-level CLIP tokenizer built from it.

"a red heart on a striped background", "a heart and a blue moon", "a green object", "" ...
Attributes are dropped at random in training so that what a prompt leaves out is sampled by the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .world import BACKGROUNDS, COLORS, SHAPES, TOY_WORLD, Scene, WorldConfig, world_config

BG_WORD = {"plain": "plain", "striped": "striped", "checkered": "checkered", "dotted": "dotted"}
WORDS = sorted({"a", "and", "on", "background", "object", *SHAPES, *COLORS, *BG_WORD.values()})
MAX_TOKENS = 16  # longest prompt ("a red heart and a blue moon on a dotted background") is 11 words + 2 specials


def max_tokens(world: str | WorldConfig = TOY_WORLD) -> int:
    """The text encoder's length for a world: 16 (v1, two objects); 20 where a scene holds three objects
    ("a red heart and a blue moon and a green circle on a dotted background" is 15 words + 2 specials)."""
    return MAX_TOKENS if world_config(world).max_objects <= 2 else 20


def describe(scene: Scene, rng: np.random.Generator | None = None, p_drop_shape: float = 0.0,
             p_drop_color: float = 0.0, p_drop_background: float = 0.0) -> str:
    """The prompt for a scene; each attribute is dropped with its probability (needs `rng` when > 0)."""
    drop = lambda p: p > 0 and rng.random() < p
    parts = []
    for obj in scene.objects:
        words = ["a"]
        if not drop(p_drop_color):
            words.append(obj.color)
        words.append("object" if drop(p_drop_shape) else obj.shape)
        parts.append(" ".join(words))
    text = " and ".join(parts)
    if not drop(p_drop_background):
        text += f" on a {BG_WORD[scene.background]} background"
    return text


def prompt(shape: str | None = None, color: str | None = None, background: str | None = None) -> str:
    """A one-object prompt naming only what is given (None = leave it to the model)."""
    for value, allowed, what in ((shape, SHAPES, "shape"), (color, tuple(COLORS), "color"), (background, BACKGROUNDS, "background")):
        if value is not None and value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; known: {allowed}")
    text = " ".join(w for w in ("a", color, shape or "object") if w)
    return text + (f" on a {BG_WORD[background]} background" if background else "")


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair with the lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        i = next(i for i in range(len(pieces) - 1) if (pieces[i], pieces[i + 1]) == pair)
        pieces[i:i + 2] = [pair[0] + pair[1]]
    return pieces


def write_word_tokenizer(folder: str | Path, words=WORDS, max_length: int = MAX_TOKENS) -> Path:
    """Write vocab.json/merges.txt for an offline `CLIPTokenizer` in which every grammar word is one token.

    CLIP's BPE builds a word from characters through ranked merges, and a merge learnt for one word can fire
    inside another ("a n" from "and" inside "triangle") and derail a naive chain. So we run the BPE on each
    word with the merges so far and append a merge of its first two pieces until it is a single token;
    appended merges rank last and never change how earlier words split.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    ranks: dict[tuple[str, str], int] = {}
    add = lambda tok: vocab.setdefault(tok, len(vocab))
    for ch in sorted({c for w in words for c in w}):
        add(ch), add(ch + "</w>")
    for w in words:
        while len(pieces := _bpe(w, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            add(pieces[0] + pieces[1])
    merges = [f"{a} {b}" for a, b in ranks]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    return folder
