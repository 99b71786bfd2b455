"""Select UNet layers by dotted-name patterns: one matcher for attention processors and for hooked modules.

Patterns are globs over dotted module paths (`*` crosses dots), with aliases and filters:
  - `down.`, `mid.`, `up.` prefixes expand to `down_blocks.`, `mid_block.`, `up_blocks.`
  - `self` / `cross` alone select every self- (`attn1`) / cross-attention (`attn2`) layer
  - a suffix `@16` keeps layers whose nominal feature map is 16x16 (at the model's default sample size)
  - `re:` starts a regular expression (fullmatch) instead of a glob
  - `=` starts an exact layer name: no aliases, no wildcards, no `@` filter (`exact(name)` writes it). Use it to
    address one layer whose name you have (from `attention_names`, a sweep, a saved result) with no escaping.
Examples: `up.*.attn1`, `cross@16`, `down_blocks.1.*attn2`, `re:up_blocks\\.[12]\\..*attn1`,
`=up_blocks.1.attentions.0.transformer_blocks.0.attn1`.
"""
from __future__ import annotations

import difflib
import fnmatch
import re

ALIASES = {"down.": "down_blocks.", "mid.": "mid_block.", "up.": "up_blocks."}
KINDS = {"self": "*.attn1", "cross": "*.attn2", "attn": "*.attn[12]"}


def resolution(unet, name: str) -> int | None:
    """Nominal side length of the feature map a UNet submodule works on (latent sample size / 2**level)."""
    cfg = getattr(unet, "config", None)
    size = getattr(cfg, "sample_size", None)
    if size is None:
        return None
    size = size[0] if isinstance(size, (tuple, list)) else size
    n = len(cfg.block_out_channels)
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and (len(parts) < 2 or not parts[1].isdigit()):
        return None  # the block list itself spans every resolution
    if parts[0] == "down_blocks":
        level = int(parts[1])
        if len(parts) > 2 and parts[2] == "downsamplers":
            level += 1
    elif parts[0] == "up_blocks":
        level = n - 1 - int(parts[1])
        if len(parts) > 2 and parts[2] == "upsamplers":
            level -= 1
    elif parts[0] == "mid_block":
        level = n - 1
    else:
        return size
    return size // 2**level


def exact(name: str) -> str:
    """The pattern that selects exactly the layer `name` (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a layer name must be a non-empty str, got {name!r}")
    return "=" + name


def _compile(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"bad regular expression in layer pattern {pattern!r}: {err}") from None
        return lambda name: rx.fullmatch(name) is not None
    glob = KINDS.get(pattern, pattern)
    for short, full in ALIASES.items():
        if glob.startswith(short):
            glob = full + glob[len(short):]
    return lambda name: fnmatch.fnmatchcase(name, glob)


def select(names, pattern: str, unet=None) -> list[str]:
    """The names matching `pattern`, in the given order; a pattern matching nothing is a ValueError."""
    if not isinstance(pattern, str):
        raise TypeError(f"a layer pattern must be a str, got {type(pattern).__name__}")
    names = list(names)
    if not pattern.strip():
        raise ValueError("an empty layer pattern selects nothing on purpose: use '*' for every layer")
    if pattern.startswith("="):
        if pattern[1:] in names:
            return [pattern[1:]]
        close = difflib.get_close_matches(pattern[1:], names, n=3, cutoff=0.6)
        raise ValueError(f"no layer is named {pattern[1:]!r} (an exact-name pattern)"
                         f"{'; close: ' + ', '.join(close) if close else ''}")
    base, res = pattern, None
    if "@" in pattern and not pattern.startswith("re:"):
        base, _, res_s = pattern.rpartition("@")
        if not res_s.isdigit():
            raise ValueError(f"bad resolution filter in {pattern!r}: use e.g. 'cross@16'")
        res = int(res_s)
        if unet is None:
            raise ValueError(f"{pattern!r} filters by resolution, which needs the UNet")
    match = _compile(base or "*")
    out = [n for n in names if match(n) and (res is None or resolution(unet, n) == res)]
    if not out:
        sizes = sorted({resolution(unet, n) for n in names} - {None}) if unet is not None else []
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ValueError(f"layer pattern {pattern!r} matches nothing. Aliases: down./mid./up., self, cross, attn"
                         f"{'; resolutions: ' + str(sizes) if sizes else ''}. Names: {shown}")
    return out


def select_many(names, patterns, unet=None) -> list[str]:
    """Union of several patterns (each must match something), in the names' order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple, set, frozenset)):
        raise TypeError(f"layer patterns must be a str or a list of str, got {type(patterns).__name__}")
    if not patterns:
        raise ValueError("no layer patterns given (an empty list selects nothing): use '*' for every layer")
    chosen = {n for p in patterns for n in select(names, p, unet)}
    return [n for n in names if n in chosen]


SHORT = ((".transformer_blocks.", ".tb"), (".attentions.", ".a"), (".resnets.", ".r"), ("down_blocks.", "down"),
         ("up_blocks.", "up"), ("mid_block", "mid"))
_BLOCKS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_PARTS = {"resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2}


def short_name(name: str, unet=None) -> str:
    """A label for plots and tables: `up_blocks.1.attentions.0.transformer_blocks.0.attn1` -> `up1.a0.tb0.attn1`
    (`down0.r1`, `mid.a0.tb0.attn2`); with the UNet, its feature-map side is appended (` @16`)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a layer name must be a non-empty str, got {name!r}")
    out = name
    for long, short in SHORT:
        out = out.replace(long, short)
    res = resolution(unet, name) if unet is not None else None
    return out if res is None else f"{out} @{res}"


def execution_order(names) -> list[str]:
    """UNet layer names sorted into the order a forward pass runs them: down blocks, mid block, up blocks; inside a
    block resnet i, then attention i, then the down/upsampler; numbers compare as numbers (`attn1` before `attn2`).
    `unet.attn_processors` and `named_modules` list the mid block after the up blocks, which is not when it runs."""
    def key(name):
        parts = name.split(".")
        block = _BLOCKS.get(parts[0], 3)
        rest = parts[1:] if parts[0] == "mid_block" else parts[2:]
        index = int(parts[1]) if parts[0] != "mid_block" and len(parts) > 1 and parts[1].isdigit() else -1
        if len(rest) >= 2 and _PARTS.get(rest[0]) in (0, 1) and rest[1].isdigit():
            inner = (int(rest[1]), _PARTS[rest[0]])
            rest = rest[2:]
        else:  # the block itself first; a down/upsampler after every resnet and attention
            inner = (-1, -1) if not rest else (1 << 30, _PARTS.get(rest[0], 3))
        return block, index, inner, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rest]

    names = list(names)
    if bad := [n for n in names if not isinstance(n, str) or not n]:
        raise TypeError(f"layer names must be non-empty str, got {bad[:3]!r}")
    return sorted(names, key=key)
