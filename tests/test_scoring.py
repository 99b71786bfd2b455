import numpy as np
import pytest

from diffnb.toyworld.scoring import identity_scores, same_identity, same_style, style_scores


class Table:
    """Probes that read each image's attributes from a table (images are indices into it)."""

    def __init__(self, **attrs):
        self.attrs = attrs

    def predict(self, x):
        idx = x[:, 0, 0, 0].astype(int)
        return {k: [v[i] for i in idx] for k, v in self.attrs.items()}


def _images(sets, n):
    return np.arange(sets * n, dtype=np.uint8).reshape(sets, n, 1, 1, 1).repeat(2, 2).repeat(2, 3).repeat(3, 4)


def test_same_style_and_same_identity_pair_by_pair():
    x = _images(2, 3)
    probes = Table(background=["dots", "dots", "plain", "plain", "plain", "plain"],
                   shape=["heart"] * 6, color=["red", "red", "red", "blue", "green", "blue"],
                   detail=["eye", "eye", "spot", "eye", "eye", "eye"])
    assert same_style(x, probes).tolist() == [True, False, True, True]  # (ref, 1), (ref, 2) of each set
    assert same_identity(x, probes).tolist() == [True, False, False, False, True, False]  # (0,1) (0,2) (1,2)
    prompts = [["a heart on a dotted background"] * 3] * 2
    assert same_identity(x, probes).mean() == identity_scores(x, prompts, probes)["identity_agreement"]
    assert same_style(x, probes).mean() == style_scores(x, [["heart"] * 3] * 2, probes)["style_agreement"]
    with pytest.raises(ValueError, match=r"\(sets, n, H, W, 3\)"):
        same_style(x[0], probes)
