"""DiffSim benchmark loaders and drivers on tiny synthetic folders of each layout.

The similarity is the negative L2 distance between mean colours of solid-colour images, so every expected
accuracy can be worked out by hand (and several are deliberately not 1.0).
"""
import math

import numpy as np
import pytest
from PIL import Image

from diffnb.papers.diffsim_benchmarks import (
    IPREF_PAIRS, Triplet, load_image, load_ipref, load_nights, load_style_retrieval, retrieval_accuracy,
    style_triplets, two_afc_accuracy, write_nights_fixture,
)

SIZE = 8
NIGHTS_HEADER = "id,left_vote,right_vote,votes,ref_path,left_path,right_path,prompt,split,is_imagenet"


def solid(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), tuple(rgb)).save(path)  # not square: the loader must resize
    return path


class MeanColour:
    """Batched similarity = -||mean colour(a) - mean colour(b)||; records the calls it gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, images_a, images_b):
        assert len(images_a) == len(images_b)
        for im in images_a + images_b:
            assert im.dtype == np.uint8 and im.shape == (SIZE, SIZE, 3)
        self.calls.append(len(images_a))
        mean = lambda ims: np.stack([im.reshape(-1, 3).mean(0) for im in ims])  # noqa: E731
        return list(-np.linalg.norm(mean(images_a) - mean(images_b), axis=1))


# ---------------------------------------------------------------- NIGHTS

def make_nights(root, rows):
    colours = {"r": (100, 100, 100), "near": (110, 100, 100), "near2": (90, 100, 100), "far": (200, 0, 0)}
    for name, rgb in colours.items():
        solid(root / "ref" / "000" / f"{name}.png", rgb)
    lines = [NIGHTS_HEADER] + [f"{i},{lv},{rv},{votes},ref/000/r.png,ref/000/{left}.png,ref/000/{right}.png,"
                               f"cat,{split},True" for i, (left, right, lv, rv, votes, split) in enumerate(rows)]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


NIGHTS_ROWS = [  # (left, right, left_vote, right_vote, votes, split)
    ("near", "far", 1, 0, 6, "val"),     # metric picks left, humans too          -> 1
    ("far", "near", 0, 1, 6, "val"),     # metric picks right, humans too         -> 1
    ("near", "far", 0, 1, 5, "val"),     # metric picks left, humans right        -> 0
    ("near", "near2", 1, 0, 6, "val"),   # both 10 away: a tie                    -> 0.5
    ("far", "near", 1, 0, 6, "train"),   # other split: ignored
]


def test_nights_loader_parses_split_votes_and_paths(tmp_path):
    triplets = load_nights(make_nights(tmp_path, NIGHTS_ROWS))
    assert len(triplets) == 4
    assert triplets[0] == Triplet(tmp_path / "ref/000/r.png", tmp_path / "ref/000/near.png",
                                  tmp_path / "ref/000/far.png", 1.0)
    assert [t.human_prefers_a for t in triplets] == [1.0, 0.0, 0.0, 1.0]
    assert len(load_nights(tmp_path, split="train")) == 1
    assert len(load_nights(tmp_path, min_votes=6)) == 3  # DreamSim's filter drops the 5-vote row


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_two_afc_accuracy_on_nights(tmp_path, batch_size):
    sim = MeanColour()
    score = two_afc_accuracy(load_nights(make_nights(tmp_path, NIGHTS_ROWS)), sim, batch_size=batch_size, size=SIZE)
    assert score == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert len(sim.calls) == math.ceil(4 / batch_size) and sum(sim.calls) == 2 * 4  # one call per batch


def test_two_afc_uses_vote_fractions(tmp_path):
    """With split votes the metric earns the fraction of humans who agree with it (DreamSim's 2AFC score)."""
    make_nights(tmp_path, [("near", "far", 3, 1, 4, "val"), ("far", "near", 3, 1, 4, "val")])
    triplets = load_nights(tmp_path)
    assert [t.human_prefers_a for t in triplets] == [0.75, 0.75]
    assert two_afc_accuracy(triplets, MeanColour(), size=SIZE) == pytest.approx((0.75 + 0.25) / 2)


def test_nights_malformed(tmp_path):
    with pytest.raises(ValueError, match="data.csv.*\n.*expected layout"):
        load_nights(tmp_path)
    make_nights(tmp_path, NIGHTS_ROWS)
    text = (tmp_path / "data.csv").read_text()
    (tmp_path / "data.csv").write_text(text.replace("right_vote", "rightvote"))
    with pytest.raises(ValueError, match="right_vote"):
        load_nights(tmp_path)
    (tmp_path / "data.csv").write_text(text.replace(",votes,", ",n,"))
    assert len(load_nights(tmp_path)) == 4  # `votes` is only needed when filtering on it
    with pytest.raises(ValueError, match="votes"):
        load_nights(tmp_path, min_votes=6)
    (tmp_path / "data.csv").write_text(text)
    (tmp_path / "ref/000/far.png").unlink()
    with pytest.raises(ValueError, match="far.png"):
        load_nights(tmp_path)
    with pytest.raises(ValueError, match="split == 'test'"):
        load_nights(tmp_path, split="test")


def test_nights_fixture_round_trip(tmp_path):
    """Triplets written in NIGHTS' layout come back through the loader pixel for pixel, the positive on the left
    with the vote, in order; the driver then scores them as the plain 2AFC of the same similarity."""
    rng = np.random.default_rng(0)
    ref, pos, neg = (rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3))
    root = write_nights_fixture(tmp_path / "nights", ref, pos, neg)
    header = (root / "data.csv").read_text().splitlines()[0].split(",")
    assert set(header) >= set(NIGHTS_HEADER.split(","))
    triplets = load_nights(root)
    assert len(triplets) == 3 and all(t.human_prefers_a == 1.0 for t in triplets)
    for i, t in enumerate(triplets):
        for path, want in ((t.ref, ref[i]), (t.a, pos[i]), (t.b, neg[i])):
            assert np.array_equal(load_image(path, None), want)
    assert load_nights(write_nights_fixture(tmp_path / "t", ref, pos, neg, split="test"), split="test")
    sim = MeanColour()
    mean = lambda x: x.reshape(len(x), -1, 3).mean(1)  # noqa: E731
    d_pos, d_neg = (np.linalg.norm(mean(ref) - mean(x), axis=1) for x in (pos, neg))
    assert two_afc_accuracy(triplets, sim, size=SIZE) == pytest.approx(np.mean(d_pos < d_neg))
    with pytest.raises(ValueError, match="same number"):
        write_nights_fixture(tmp_path / "bad", ref, pos, neg[:2])
    with pytest.raises(TypeError, match="uint8"):
        write_nights_fixture(tmp_path / "bad", ref.astype(float), pos, neg)


# ---------------------------------------------------------------- Sref-style retrieval

STYLES = {  # style c has an outlier, c2, that is red like style a
    "a": [(255, 0, 0), (245, 0, 0)],
    "b": [(0, 250, 0), (0, 240, 0)],
    "c": [(0, 0, 255), (230, 0, 0)],
}


def make_styles(root):
    for style, colours in STYLES.items():
        for i, rgb in enumerate(colours):
            solid(root / "sref" / style / f"{i}.png", rgb)
    solid(root / "sref" / "lonely" / "0.png", (1, 2, 3))  # one image: not a group
    (root / "sref" / "c" / "notes.txt").write_text("not an image")
    return root / "sref"


def test_style_loader_groups_folders(tmp_path):
    groups = load_style_retrieval(make_styles(tmp_path))
    assert sorted(groups) == ["a", "b", "c"]
    assert [p.name for p in groups["c"]] == ["0.png", "1.png"]
    solid(tmp_path / "sref" / "nested" / "d" / "0.jpg", (9, 9, 9))
    solid(tmp_path / "sref" / "nested" / "d" / "1.JPEG", (9, 9, 9))
    assert "nested/d" in load_style_retrieval(tmp_path / "sref")  # style_main.py walks the whole tree


def test_retrieval_accuracy_top_k(tmp_path):
    """Every query's nearest neighbour is its style mate except c2's: a2 (15), a1 (25), b2 (332), b1 (340), then
    c1 (343). So top-1 and top-4 are 5/6 and top-5 is 1."""
    groups = load_style_retrieval(make_styles(tmp_path))
    sim = MeanColour()
    assert retrieval_accuracy(groups, sim, k=1, batch_size=7, size=SIZE) == pytest.approx(5 / 6)
    assert sum(sim.calls) == 6 * 5 and len(sim.calls) == math.ceil(30 / 7)
    assert retrieval_accuracy(groups, MeanColour(), k=4, size=SIZE) == pytest.approx(5 / 6)
    assert retrieval_accuracy(groups, MeanColour(), k=5, size=SIZE) == 1.0
    with pytest.raises(ValueError, match="k=6"):
        retrieval_accuracy(groups, MeanColour(), k=6, size=SIZE)


def test_style_triplets_follow_style_main(tmp_path):
    groups = load_style_retrieval(make_styles(tmp_path))
    triplets = style_triplets(groups, n=200, seed=1)
    assert len(triplets) == 200 and triplets == style_triplets(groups, n=200, seed=1)
    style = {p: name for name, paths in groups.items() for p in paths}
    assert all(style[t.ref] == style[t.a] != style[t.b] and t.ref != t.a for t in triplets)
    # Expected score counted independently from the colours: A's style mate must be closer than C.
    colour = {p: np.array(STYLES[style[p]][int(p.stem)], float) for p in style}
    d = lambda x, y: np.linalg.norm(colour[x] - colour[y])  # noqa: E731
    assert all(d(t.ref, t.a) != d(t.ref, t.b) for t in triplets)  # no ties (they would score 0.5)
    expected = np.mean([d(t.ref, t.a) < d(t.ref, t.b) for t in triplets])
    assert 0.5 < expected < 1.0
    assert two_afc_accuracy(triplets, MeanColour(), batch_size=16, size=SIZE) == pytest.approx(expected)


def test_style_malformed(tmp_path):
    with pytest.raises(ValueError, match="missing style benchmark folder"):
        load_style_retrieval(tmp_path / "nope")
    solid(tmp_path / "s" / "a" / "0.png", (0, 0, 0))
    solid(tmp_path / "s" / "a" / "1.png", (0, 0, 0))
    with pytest.raises(ValueError, match="1 folder.*expected layout: root/<style>"):
        load_style_retrieval(tmp_path / "s")


# ---------------------------------------------------------------- IPref

WEIGHTS = sorted({w for pair in IPREF_PAIRS for w in pair})


def make_ipref(root):
    """'good': the weight-w image is (255 w, 0, 0), so higher weight = closer to the red reference (5/5 right);
    'flipped': (255 (1 - w), 0, 0), so the metric disagrees with the weight order every time (0/5)."""
    for character, shade in (("good", lambda w: w), ("flipped", lambda w: 1 - w)):
        for w in WEIGHTS:
            solid(root / "IPref" / character / f"{w}.png", (round(255 * shade(float(w))), 0, 0))
    solid(root / "originals" / "good.JPG", (255, 0, 0))
    solid(root / "originals" / "flipped.png", (255, 0, 0))  # other extensions are accepted too
    return root / "IPref", root / "originals"


def test_ipref_loader_and_accuracy(tmp_path):
    triplets = load_ipref(*make_ipref(tmp_path))
    assert len(triplets) == 10 and all(t.human_prefers_a == 1.0 for t in triplets)
    official = [("1.0", "0.6"), ("0.8", "0.4"), ("0.6", "0.3"), ("0.4", "0.35"), ("0.3", "0.2")]  # ipref_main.py
    assert [(t.a.stem, t.b.stem) for t in triplets[:5]] == official
    assert triplets[0].ref.name == "flipped.png" and triplets[5].ref.name == "good.JPG"
    assert two_afc_accuracy(triplets, MeanColour(), batch_size=4, size=SIZE) == pytest.approx(0.5)


def test_ipref_malformed(tmp_path):
    root, originals = make_ipref(tmp_path)
    (root / "good" / "0.35.png").unlink()
    with pytest.raises(ValueError, match=r"0\.35\.png.*\n.*expected layout"):
        load_ipref(root, originals)
    (originals / "flipped.png").unlink()
    with pytest.raises(ValueError, match="flipped.JPG"):
        load_ipref(root, originals)


# ---------------------------------------------------------------- shared pieces

def test_load_image_and_similarity_contract(tmp_path):
    path = solid(tmp_path / "x.png", (1, 2, 3))
    im = load_image(path, (6, 4))
    assert im.dtype == np.uint8 and im.shape == (4, 6, 3) and (im == (1, 2, 3)).all()
    assert load_image(path, None).shape == (10, 12, 3)
    im[:] = 0  # a private copy: the cached decode is untouched
    assert (load_image(path, (6, 4)) == (1, 2, 3)).all()
    triplets = [Triplet(path, path, path)] * 3
    with pytest.raises(ValueError, match="2 scores for 6 pairs"):
        two_afc_accuracy(triplets, lambda a, b: [0.0, 1.0], size=SIZE)
