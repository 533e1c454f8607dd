"""Fashion-MNIST scenes: a compositional text-to-image benchmark, offline, from the Fashion-MNIST files.

A scene is a 64 × 64 grayscale canvas of 2 × 2 cells of 32 × 32 (cell 0 top left, 1 top right, 2 bottom left,
3 bottom right). Each cell is empty or holds one Fashion-MNIST item (28 × 28, centred in its cell, shifted by up to
``JITTER`` pixels). A *layout* is the 4 cell labels (class 0–9, −1 empty); there are 11⁴ = 14,641 layouts.

Splits never share items: train scenes take items from the train file minus the validation hold-out
(``train_val_split(60000, val_size, seed=0)``, the same hold-out as the single-garment benchmark), val scenes from that
hold-out, test scenes from the test file. Scene i of a split is fixed by (split, i, seed) alone (drawn in blocks of
``BLOCK`` scenes from a generator seeded by (seed, split, block)), so any prefix of a split is the same scenes.

Captions are generated from the layout by a small grammar with ``NUM_VARIANTS`` variants per layout (synonyms, three
phrasings of each position, row / column grouping of equal pairs, "alone" for single items, several orders), e.g.
"a sneaker in the top left and a bag in the bottom right", "two pairs of trousers on the top row", "an ankle boot alone
in the bottom right corner". A caption is a list of *clauses* joined by ", " and " and "; cells no clause names are
empty. ``parse_caption`` inverts the grammar from the text alone.

Text features: the text encoder runs once per distinct clause (about a thousand), not per caption (14,641 × 3): a
caption's token features are its clauses' MiniLM token features side by side, its pooled feature the normalised mean of
its clauses' pooled features. The cache of those clause features is stored as int8 with a per-token scale
(``SceneTextCache``; ``e2ediff encode-prompts --dataset fashion-scenes`` writes it).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from e2ediff.conditioning import TextCond

CANVAS = 64                  # scene height = width
CELL = 32                    # cell height = width; cell c sits at row c // 2, column c % 2
ITEM = 28                    # Fashion-MNIST item size
PAD = (CELL - ITEM) // 2     # an unshifted item starts PAD pixels into its cell
JITTER = 2                   # items shift by up to ±JITTER pixels per axis (they stay inside the cell)
P_EMPTY = 0.3                # probability that a cell is empty
NUM_CELLS = 4
NUM_CLASSES = 10
NUM_LAYOUTS = (NUM_CLASSES + 1) ** NUM_CELLS   # 14,641
NUM_VARIANTS = 3             # captions per layout
BLOCK = 1000                 # scenes per generator block
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 60000, "val": 5000, "test": 10000}
CLAUSE_TOKENS = 16           # MiniLM tokens kept per clause ([CLS] ... [SEP]); every clause of the grammar fits
MAX_CLAUSES = 4              # a caption has at most 4 clauses, so at most 64 tokens

# ------------------------------------------------------------------------------------------------------------ grammar

# (singular, plural) names per class; the first is the plain name, the second a synonym.
NOUNS = (
    (("t-shirt", "t-shirts"), ("tee", "tees")),
    (("pair of trousers", "pairs of trousers"), ("pair of pants", "pairs of pants")),
    (("pullover", "pullovers"), ("sweater", "sweaters")),
    (("dress", "dresses"), ("frock", "frocks")),
    (("coat", "coats"), ("jacket", "jackets")),
    (("sandal", "sandals"), ("summer sandal", "summer sandals")),
    (("shirt", "shirts"), ("blouse", "blouses")),
    (("sneaker", "sneakers"), ("trainer", "trainers")),
    (("bag", "bags"), ("handbag", "handbags")),
    (("ankle boot", "ankle boots"), ("boot", "boots")),
)
# Three phrasings of each cell's position (cells 0..3).
CELL_PHRASES = (
    ("in the top left", "in the top right", "in the bottom left", "in the bottom right"),
    ("at the upper left", "at the upper right", "at the lower left", "at the lower right"),
    ("in the top left corner", "in the top right corner", "in the bottom left corner", "in the bottom right corner"),
)
ROW_PHRASES = (("on the top row", "on the bottom row"), ("along the top", "along the bottom"))
COLUMN_PHRASES = (("in the left column", "in the right column"), ("down the left side", "down the right side"))
EMPTY_CAPTIONS = ("an empty canvas", "a blank scene", "nothing at all")
ROWS = ((0, 1), (2, 3))
COLUMNS = ((0, 2), (1, 3))


def with_article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def layout_code(layout: Sequence[int]) -> int:
    """Layout (4 labels in −1..9) -> 0..14640, base 11 with cell 0 most significant (label + 1 per digit)."""
    code = 0
    for v in layout:
        code = code * (NUM_CLASSES + 1) + int(v) + 1
    return code


def layout_from_code(code: int) -> tuple[int, ...]:
    digits = []
    for _ in range(NUM_CELLS):
        code, d = divmod(int(code), NUM_CLASSES + 1)
        digits.append(d - 1)
    return tuple(reversed(digits))


def _single(label: int, cell: int, variant: int) -> str:
    noun = NOUNS[label][variant % 2 if variant < 2 else (label + cell) % 2][0]
    return f"{with_article(noun)} {CELL_PHRASES[variant][cell]}"


def caption_clauses(layout: Sequence[int], variant: int) -> list[str]:
    """The clauses of caption ``variant`` (0..NUM_VARIANTS−1) of ``layout``, in caption order."""
    layout = [int(v) for v in layout]
    if len(layout) != NUM_CELLS or any(not -1 <= v < NUM_CLASSES for v in layout):
        raise ValueError(f"a layout is {NUM_CELLS} labels in -1..{NUM_CLASSES - 1}, got {layout}")
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"variant must be in 0..{NUM_VARIANTS - 1}, got {variant}")
    filled = [c for c in range(NUM_CELLS) if layout[c] >= 0]
    if not filled:
        return [EMPTY_CAPTIONS[variant]]
    if variant == 0:                       # cell by cell, reading order, plain names
        return [_single(layout[c], c, 0) for c in filled]
    if variant == 2 and len(filled) == 1:  # "an ankle boot alone in the bottom right corner"
        c = filled[0]
        noun = NOUNS[layout[c]][(layout[c] + c) % 2][0]
        return [f"{with_article(noun)} alone {CELL_PHRASES[2][c]}"]
    # Variants 1 and 2: equal pairs grouped (variant 1: rows first; variant 2: columns first), the rest cell by cell.
    groups = (ROWS, COLUMNS) if variant == 1 else (COLUMNS, ROWS)
    phrases = {ROWS: ROW_PHRASES[variant - 1], COLUMNS: COLUMN_PHRASES[variant - 1]}
    used: set[int] = set()
    parts: list[tuple[int, str]] = []      # (first cell, clause) for ordering
    for pairs in groups:
        for i, (a, b) in enumerate(pairs):
            if a in used or b in used or layout[a] < 0 or layout[a] != layout[b]:
                continue
            noun = NOUNS[layout[a]][variant - 1][1]
            parts.append((a, f"two {noun} {phrases[pairs][i]}"))
            used.update((a, b))
    parts += [(c, _single(layout[c], c, variant)) for c in filled if c not in used]
    parts.sort(key=lambda p: p[0], reverse=variant == 2)   # variant 2 reads from the bottom right
    return [clause for _, clause in parts]


def join_clauses(clauses: Sequence[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def scene_caption(layout: Sequence[int], variant: int) -> str:
    return join_clauses(caption_clauses(layout, variant))


_NOUN_FORMS = sorted({(form, label, plural) for label, names in enumerate(NOUNS) for name in names
                      for plural, form in enumerate(name)}, key=lambda f: -len(f[0]))
_NOUN_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f[0]) for f in _NOUN_FORMS) + r")(?![\w-])")
_NOUN_INFO = {form: (label, plural) for form, label, plural in _NOUN_FORMS}
_SPLIT_RE = re.compile(r", | and ")


def split_clauses(caption: str) -> list[str]:
    """A caption's clauses (the inverse of ``join_clauses``; no clause contains ", " or " and ")."""
    return _SPLIT_RE.split(caption.strip())


def _clause_cells(clause: str) -> tuple[int, list[int]]:
    """(label, cells) that one clause names, read from its words."""
    found = _NOUN_RE.findall(clause)
    if len(found) != 1:
        raise ValueError(f"clause {clause!r} names {len(found)} items, expected 1")
    label, plural = _NOUN_INFO[found[0]]
    words = set(re.findall(r"[a-z]+", clause.replace(found[0], " ")))
    vertical = {0 for w in ("top", "upper") if w in words} | {1 for w in ("bottom", "lower") if w in words}
    horizontal = {0 for w in ("left",) if w in words} | {1 for w in ("right",) if w in words}
    if len(vertical) > 1 or len(horizontal) > 1:
        raise ValueError(f"clause {clause!r} names contradictory positions")
    if plural:
        if "two" not in words:
            raise ValueError(f"clause {clause!r}: a plural needs 'two'")
        if vertical and not horizontal:          # a row
            (r,) = vertical
            return label, list(ROWS[r])
        if horizontal and not vertical:          # a column
            (c,) = horizontal
            return label, list(COLUMNS[c])
        raise ValueError(f"clause {clause!r}: a pair needs a row or a column")
    if not (vertical and horizontal):
        raise ValueError(f"clause {clause!r} names no cell")
    return label, [2 * next(iter(vertical)) + next(iter(horizontal))]


def parse_caption(caption: str) -> tuple[int, ...]:
    """The layout a caption describes, read from its text (cells it does not name are empty)."""
    text = caption.strip().lower()
    if text in EMPTY_CAPTIONS:
        return (-1,) * NUM_CELLS
    layout = [-1] * NUM_CELLS
    for clause in split_clauses(text):
        label, cells = _clause_cells(clause)
        for c in cells:
            if layout[c] != -1:
                raise ValueError(f"caption {caption!r} names cell {c} twice")
            layout[c] = label
    return tuple(layout)


@lru_cache(maxsize=1)
def clause_vocabulary() -> tuple[str, ...]:
    """Every clause of the grammar's words, sorted: what the text cache encodes. A superset of the clauses the
    caption variants write (any name with any phrasing), so hand-written prompts in the grammar have features too."""
    clauses = set(EMPTY_CAPTIONS)
    for names in NOUNS:
        for singular, plural in names:
            for cell_phrases in CELL_PHRASES:
                clauses.update(f"{with_article(singular)} {p}" for p in cell_phrases)
                clauses.update(f"{with_article(singular)} alone {p}" for p in cell_phrases)
            for phrases in ROW_PHRASES + COLUMN_PHRASES:
                clauses.update(f"two {plural} {p}" for p in phrases)
    return tuple(sorted(clauses))


@lru_cache(maxsize=1)
def caption_clause_table() -> np.ndarray:
    """int16 [NUM_LAYOUTS · NUM_VARIANTS, MAX_CLAUSES]: clause ids (into ``clause_vocabulary()``) of caption
    code · NUM_VARIANTS + variant, −1 past its last clause."""
    index = {c: i for i, c in enumerate(clause_vocabulary())}
    table = np.full((NUM_LAYOUTS * NUM_VARIANTS, MAX_CLAUSES), -1, dtype=np.int16)
    for code in range(NUM_LAYOUTS):
        layout = layout_from_code(code)
        for v in range(NUM_VARIANTS):
            ids = [index[c] for c in caption_clauses(layout, v)]
            table[code * NUM_VARIANTS + v, :len(ids)] = ids
    return table


# ------------------------------------------------------------------------------------------------------------- scenes


@dataclass
class Scenes:
    """A split's scenes. images uint8 [N, 64, 64]; layouts int64 [N, 4]; items int64 [N, 4]: the index of each cell's
    item in its Fashion-MNIST file (train file for train / val, test file for test), −1 when empty; shifts int64
    [N, 4, 2]: (dy, dx) of each item inside its cell."""

    split: str
    images: np.ndarray
    layouts: np.ndarray
    items: np.ndarray
    shifts: np.ndarray

    def __len__(self) -> int:
        return len(self.layouts)

    def codes(self) -> np.ndarray:
        return (self.layouts + 1) @ ((NUM_CLASSES + 1) ** np.arange(NUM_CELLS - 1, -1, -1))

    def captions(self, variant: int = 0) -> list[str]:
        return [scene_caption(layout, variant) for layout in self.layouts]


def item_pool(split: str, data_dir=None, val_size: int = 5000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [M, 28, 28] of the whole file, labels [M], indices of the items this split may use)."""
    from e2ediff.data.fashion_mnist import load_fashion_mnist, train_val_split

    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    images, labels = load_fashion_mnist("test" if split == "test" else "train", data_dir)
    if split == "test":
        return images, labels, np.arange(len(labels))
    train_idx, val_idx = train_val_split(len(labels), val_size, seed=0)
    return images, labels, (train_idx if split == "train" else val_idx).numpy()


def scene_plan(split: str, n: int, pool_labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(layouts [n, 4], items [n, 4], shifts [n, 4, 2]) of scenes 0..n−1; ``pool_labels`` are the labels of the
    split's item pool (items index into it). Scene i depends only on (split, i, seed)."""
    by_class = [np.flatnonzero(pool_labels == c) for c in range(NUM_CLASSES)]
    if any(len(b) == 0 for b in by_class):
        raise ValueError(f"the {split} item pool lacks a class; every class needs at least one item")
    layouts, items, shifts = [], [], []
    for block in range(-(-n // BLOCK)):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], block])
        empty = rng.random((BLOCK, NUM_CELLS)) < P_EMPTY
        lay = np.where(empty, -1, rng.integers(0, NUM_CLASSES, (BLOCK, NUM_CELLS)))
        u = rng.random((BLOCK, NUM_CELLS))
        it = np.full((BLOCK, NUM_CELLS), -1, dtype=np.int64)
        for c in range(NUM_CLASSES):
            hit = lay == c
            it[hit] = by_class[c][(u[hit] * len(by_class[c])).astype(np.int64)]
        layouts.append(lay)
        items.append(it)
        shifts.append(rng.integers(-JITTER, JITTER + 1, (BLOCK, NUM_CELLS, 2)))
    return (np.concatenate(layouts)[:n].astype(np.int64), np.concatenate(items)[:n],
            np.concatenate(shifts)[:n].astype(np.int64))


def compose(item_images: Tensor, items: Tensor, shifts: Tensor) -> Tensor:
    """uint8 canvases [N, 64, 64] from item images uint8 [M, 28, 28], items [N, 4] (−1 empty) and shifts [N, 4, 2]."""
    n = items.shape[0]
    grid = torch.arange(CELL, device=items.device)
    src_r = grid[None, None, :] - PAD - shifts[..., 0:1]          # [N, 4, 32] source row of each tile row
    src_c = grid[None, None, :] - PAD - shifts[..., 1:2]
    inside = ((src_r >= 0) & (src_r < ITEM))[..., :, None] & ((src_c >= 0) & (src_c < ITEM))[..., None, :]
    inside &= (items >= 0)[..., None, None]
    tiles = item_images[items.clamp(min=0)[..., None, None], src_r.clamp(0, ITEM - 1)[..., :, None],
                        src_c.clamp(0, ITEM - 1)[..., None, :]]   # [N, 4, 32, 32]
    tiles = torch.where(inside, tiles, torch.zeros((), dtype=tiles.dtype, device=tiles.device))
    tiles = tiles.view(n, 2, 2, CELL, CELL).permute(0, 1, 3, 2, 4)  # [N, row, y, col, x]
    return tiles.reshape(n, CANVAS, CANVAS)


def load_scenes(split: str, n: int | None = None, seed: int = 0, data_dir=None, val_size: int = 5000) -> Scenes:
    """The first ``n`` scenes (default DEFAULT_SIZES[split]) of a split."""
    n = DEFAULT_SIZES[split] if n is None else int(n)
    if n < 1:
        raise ValueError(f"number of scenes must be >= 1, got {n}")
    images, labels, pool = item_pool(split, data_dir, val_size)
    layouts, items, shifts = scene_plan(split, n, labels[pool], seed)
    items = np.where(items >= 0, pool[items.clip(min=0)], -1)      # pool position -> index in the file
    canvas = compose(torch.as_tensor(images), torch.as_tensor(items), torch.as_tensor(shifts)).numpy()
    return Scenes(split, canvas, layouts, items, shifts)


def cell_crops(images: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The four 28 × 28 centre crops of each cell: [N, 64, 64] -> [N, 4, 28, 28] (cell order 0..3)."""
    x = images.reshape(len(images), 2, CELL, 2, CELL)[:, :, PAD:PAD + ITEM, :, PAD:PAD + ITEM]
    x = x.transpose(2, 3) if isinstance(x, Tensor) else x.transpose(0, 1, 3, 2, 4)
    return x.reshape(len(images), NUM_CELLS, ITEM, ITEM)


# ----------------------------------------------------------------------------------------------------- text features

SCENE_CACHE_FORMAT = "e2ediff.scene_text_cache.v1"


@dataclass
class SceneTextCache:
    """MiniLM features of every clause: tokens int8 [C, L, D] with a float32 scale per token [C, L] (value =
    int8 · scale), mask bool [C, L], pooled float32 [C, D]. ``cond`` assembles caption features from clause ids."""

    clauses: list[str]
    encoder: str
    tokens_q: Tensor
    scale: Tensor
    mask: Tensor
    pooled: Tensor

    @property
    def key(self) -> str:
        from e2ediff.models.text import cache_key

        return cache_key(self.encoder, self.clauses, self.tokens_q.shape[1])

    @classmethod
    def build(cls, clauses: Sequence[str] | None = None, encoder=None) -> "SceneTextCache":
        from e2ediff.models.text import ENCODER_NAME, encode_captions

        clauses = list(clause_vocabulary() if clauses is None else clauses)
        tokens, mask, pooled = encode_captions(clauses, CLAUSE_TOKENS + 1, encoder)
        if mask[:, CLAUSE_TOKENS].any():
            raise ValueError(f"a clause has more than {CLAUSE_TOKENS} tokens; raise CLAUSE_TOKENS")
        tokens, mask = tokens[:, :CLAUSE_TOKENS], mask[:, :CLAUSE_TOKENS]
        q, scale = quantize_int8(tokens)
        return cls(clauses, ENCODER_NAME, q, scale, mask, pooled)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        from e2ediff.checkpoint import atomic_write_bytes

        meta = {"format": SCENE_CACHE_FORMAT, "clauses": json.dumps(self.clauses), "encoder": self.encoder,
                "key": self.key}
        blob = save({"tokens_q": self.tokens_q.contiguous(), "scale": self.scale.contiguous(),
                     "mask": self.mask.contiguous(), "pooled": self.pooled.half().contiguous()}, metadata=meta)
        path = Path(path)
        atomic_write_bytes(path, blob)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SceneTextCache":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scene text cache {path} not found; make it with "
                                    f"`e2ediff encode-prompts --dataset fashion-scenes`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != SCENE_CACHE_FORMAT:
            raise ValueError(f"{path}: not a scene text cache (format {meta.get('format')!r})")
        cache = cls(json.loads(meta["clauses"]), meta["encoder"], t["tokens_q"], t["scale"], t["mask"],
                    t["pooled"].float())
        if cache.key != meta.get("key"):
            raise ValueError(f"{path}: stored key does not match its clauses; the file was edited or is corrupt")
        return cache

    def check_vocabulary(self, path="the scene text cache") -> None:
        if self.clauses != list(clause_vocabulary()):
            missing = sorted(set(clause_vocabulary()) - set(self.clauses))[:3]
            raise ValueError(f"{path} was made for another caption grammar (missing e.g. {missing}); "
                             f"rebuild it with `e2ediff encode-prompts --dataset fashion-scenes`")

    def tokens(self) -> Tensor:
        return self.tokens_q.float() * self.scale[..., None]

    def cond(self, clause_ids: Tensor, tokens: Tensor | None = None) -> TextCond:
        """TextCond of captions given as clause ids [B, MAX_CLAUSES] (−1 padding): tokens [B, 4·L, D] (each clause's
        tokens in its own slot), mask, pooled = normalised mean of the clauses' pooled features."""
        return assemble_cond(self.tokens() if tokens is None else tokens, self.mask, self.pooled, clause_ids)

    def ids_of(self, captions: Sequence[str]) -> Tensor:
        index = {c: i for i, c in enumerate(self.clauses)}
        rows = []
        for caption in captions:
            clauses = split_clauses(caption.strip().lower())
            if len(clauses) > MAX_CLAUSES or any(c not in index for c in clauses):
                raise KeyError(f"caption {caption!r} is not made of the grammar's clauses")
            rows.append([index[c] for c in clauses] + [-1] * (MAX_CLAUSES - len(clauses)))
        return torch.tensor(rows, dtype=torch.int64)


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dim: (q int8, scale float32 [...]) with x ≈ q · scale (error ≤ scale/2)."""
    scale = x.abs().amax(-1).clamp(min=1e-12) / 127.0
    q = torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def assemble_cond(tokens: Tensor, mask: Tensor, pooled: Tensor, clause_ids: Tensor) -> TextCond:
    ids = clause_ids.to(tokens.device).long()
    valid = ids >= 0
    safe = ids.clamp(min=0)
    b, k = ids.shape
    tok = (tokens[safe] * valid[..., None, None]).reshape(b, k * tokens.shape[1], tokens.shape[2])
    msk = (mask[safe] & valid[..., None]).reshape(b, k * mask.shape[1])
    pool = (pooled[safe] * valid[..., None]).sum(1)
    pool = pool / pool.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return TextCond(tok, msk, pool)


def default_scene_cache_path() -> Path:
    from e2ediff.data.fashion_mnist import cache_dir
    from e2ediff.models.text import ENCODER_NAME, cache_key

    return cache_dir() / f"scenes-text-{cache_key(ENCODER_NAME, list(clause_vocabulary()), CLAUSE_TOKENS)[:16]}.safetensors"


def load_scene_text_cache(path: str | os.PathLike | None = None) -> SceneTextCache:
    """The clause cache at ``path`` (default ``default_scene_cache_path()``), checked against the grammar."""
    path = Path(path) if path is not None else default_scene_cache_path()
    cache = SceneTextCache.load(path)
    cache.check_vocabulary(path)
    return cache


def is_scenes_pipeline(meta: dict) -> bool:
    """A pipeline file trained on scenes carries the clause vocabulary as its caption list."""
    return list(meta.get("captions") or []) == list(clause_vocabulary())


# ------------------------------------------------------------------------------------------------- training data


class SceneTrainingData:
    """What the training tasks read (the interface of ``assets.TrainingData``) for ``data.dataset=fashion-scenes``.

    images float32 [N, 1, 64, 64] in [-1, 1] on the device; labels int64 [N]: the layout code (0..14640), so that
    E2E's groups are "same layout"; captions: the clause vocabulary (what a pipeline file records). Each draw picks
    one of the layout's NUM_VARIANTS captions from the step's generator; the caption index is code · 3 + variant.
    """

    def __init__(self, cfg, split: str = "train", device: torch.device | str = "cpu", prompt_cache=None):
        self.device = torch.device(device)
        n = cfg.num_scenes if cfg.num_scenes > 0 else None
        scenes = load_scenes(split, n, seed=0, data_dir=cfg.data_dir, val_size=cfg.val_size)
        self.scenes = scenes
        self.images = (torch.as_tensor(scenes.images).to(self.device).float() / 127.5 - 1.0).unsqueeze(1)
        self.labels = torch.as_tensor(scenes.codes(), dtype=torch.long, device=self.device)
        self.layouts = torch.as_tensor(scenes.layouts, device=self.device)
        self.captions = list(clause_vocabulary())
        self._cache_path = cfg.prompt_cache if prompt_cache is None else prompt_cache
        self._text = None   # read on first use: the autoencoder never needs it

    def _features(self):
        if self._text is None:
            cache = load_scene_text_cache(self._cache_path)
            self._text = (cache.tokens().to(self.device), cache.mask.to(self.device), cache.pooled.to(self.device),
                          torch.as_tensor(caption_clause_table().astype(np.int64), device=self.device))
        return self._text

    def __len__(self) -> int:
        return len(self.images)

    def caption_indices(self, idx: Tensor, generator: torch.Generator | None) -> Tensor:
        codes = self.labels[idx]
        if generator is None:
            return codes * NUM_VARIANTS
        u = torch.rand(len(idx), generator=generator, device=generator.device).to(self.device)
        return codes * NUM_VARIANTS + (u * NUM_VARIANTS).long().clamp(max=NUM_VARIANTS - 1)

    def cond(self, caption_idx: Tensor) -> TextCond:
        tokens, mask, pooled, table = self._features()
        return assemble_cond(tokens, mask, pooled, table[caption_idx.to(self.device)])

    def batch(self, idx: Tensor, generator: torch.Generator | None):
        idx = idx.to(self.device)
        caps = self.caption_indices(idx, generator)
        return self.images[idx], self.cond(caps), self.labels[idx], caps
