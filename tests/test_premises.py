"""Premise tests (issue 17): their arithmetic against hand-made cases, their structure on the tiny SD1.5 / SDXL
pipelines (any pipeline works), and the whole run on the toy at tiny sizes."""
import numpy as np
import pytest
import torch

from diffnb import premises
from diffnb.papers import emerdiff
from diffnb.papers.emerdiff import EmerDiffArgs, Segmentation

LAYERS = dict(query_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
              modulate_layer="up_blocks.1.attentions.1.transformer_blocks.0.attn2")
pytestmark = pytest.mark.filterwarnings("ignore:query_layer .* works at")


def colour_scorer(images):
    """A scorer for any pipeline: the brightest channel of the image's mean colour, and a brightness bin."""
    x = np.asarray(images).reshape(len(images), -1, 3).mean(1)
    return {"color": list(x.argmax(1)), "detail": list((x.mean(1) > 127).astype(int)),
            "shape": ["heart"] * len(images), "background": list(x.argmin(1))}


def test_locality_ratio_is_energy_share_over_area_share(monkeypatch):
    """Written from the definition: segment s owns a quarter of the image; its difference map puts 3/4 of its energy
    inside that quarter, so the ratio is (3/4) / (1/4) = 3. Segments are fed through a stand-in `segment`."""
    lowres = np.zeros((4, 4), int)
    lowres[:2, :2], lowres[:2, 2:], lowres[2:, :2], lowres[2:, 2:] = 0, 1, 2, 3
    diffs = np.zeros((4, 16, 16))
    for s, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        diffs[s] = 1.0 / 192  # 1/4 of the energy over the 192 pixels outside its quarter ...
        diffs[s, r:r + 8, c:c + 8] = 3.0 / 64  # ... 3/4 over its own 64
    seen = []

    def fake_segment(pipe, image, args):
        seen.append(args.n_segments)
        return Segmentation(lowres, diffs, diffs.argmax(0), np.zeros((9, 16, 16, 3), np.uint8), 0.0, args.t_m)

    monkeypatch.setattr(emerdiff, "segment", fake_segment)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :8, :8], masks[1] = True, True
    masks[1, :8, :8] = False
    res = premises.emerdiff_locality(None, [np.zeros((16, 16, 3), np.uint8)], [2], EmerDiffArgs(**LAYERS), masks=[masks])
    assert seen == [4]  # K = 2 x the 2 regions
    assert res.value == pytest.approx(3.0) and res.details["modulations"] == 4
    assert res.holds and res.details["median_object_segments"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        premises.emerdiff_locality(None, [np.zeros((16, 16, 3), np.uint8)], [2], EmerDiffArgs(**LAYERS), segments_per_region=1)
    with pytest.raises(ValueError):
        premises.emerdiff_locality(None, [np.zeros((16, 16, 3), np.uint8)], [2])  # the layers are model-specific


def test_agreement_counts_pairs_where_every_attribute_agrees():
    labels = np.array([[["red", "dot"], ["red", "dot"], ["red", "band"]],   # pairs: (0,1) yes, (0,2) no, (1,2) no
                       [["blue", "none"], ["blue", "none"], ["blue", "none"]]])  # all 3 yes
    assert premises._agreement(labels) == pytest.approx(4 / 6)


def test_bad_scorers_are_named():
    with pytest.raises(TypeError):
        premises.consistory_transfer(None, "probes", [["a heart", "a heart"]], ["heart"], [[0, 1]])
    with pytest.raises(ValueError):
        premises._score(lambda x: {"color": [0] * len(x)}, np.zeros((2, 8, 8, 3), np.uint8), ("color", "detail"))
    with pytest.raises(ValueError):
        premises.consistory_transfer(None, colour_scorer, [["a heart", "a heart"]], ["heart", "moon"], [[0, 1]])
    with pytest.raises(ValueError):
        premises.hyperfeatures_timestep_gain(None, [], [], steps=(0,))


def test_premises_run_on_tiny_pipelines(tiny):
    """Structure on SD1.5- and SDXL-shaped random pipelines: each test returns one finite number and its details."""
    from diffnb.toyworld import ToyDataset

    imgs = [ToyDataset("heldout", 2)[i].image for i in range(2)]
    loc = premises.emerdiff_locality(tiny, imgs, 1, EmerDiffArgs(**LAYERS, num_inference_steps=5, t_m=401))
    assert np.isfinite(loc.value) and loc.details["modulations"] >= 1
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    ct = premises.consistory_transfer(tiny, colour_scorer, [["a photo of a cat", "a cat in the style"]], ["cat"],
                                      [[0, 1]], **kw)
    assert -1 <= ct.value <= 1 and "shared_identity_agreement" in ct.details
    sa = premises.style_aligned_shape(tiny, colour_scorer, [["a cat", "a dog"]], [["heart", "heart"]], [0], **kw)
    assert sa.value == pytest.approx(1.0)  # the scorer always reads "heart"
    pairs = premises.toy_keypoint_pairs(2, "train", seed=1)
    hf = premises.hyperfeatures_timestep_gain(tiny, pairs, pairs, steps=(0, 2), num_inference_steps=3, train_steps=2,
                                              projection_dim=8, output_size=8)
    assert np.isfinite(hf.value) and set(hf.details["one_step_pck"]) == {"0", "2"}


def test_world_keypoint_pairs_match_v1_recipe():
    from diffnb.toyworld.scoring import keypoint_pairs

    a, b = premises.toy_keypoint_pairs(2, "heldout", seed=3), keypoint_pairs(2, "heldout", seed=3)
    assert all(np.array_equal(x.src_image, y.src_image) and np.array_equal(x.trg_kps, y.trg_kps) for x, y in zip(a, b))
    tex = premises.toy_keypoint_pairs(2, "heldout", world="v2", seed=3, extra_points=5)
    for p in tex:
        assert len(p.src_kps) == len(p.names) >= 2
        assert (p.src_kps >= 0).all() and (p.src_kps <= 64).all()


def test_toy_premises_tiny_sizes():
    from diffnb.models import load_pipeline, toy_is_trained
    from diffnb.toyworld.probes import Probes

    if not toy_is_trained():
        pytest.skip("no trained toy model")
    pipe = load_pipeline("toy", device="cpu")
    res = premises.toy_premises(pipe, Probes().predict, sizes="tiny", progress=False)
    assert set(res) == set(premises.BARS)
    assert all(np.isfinite(r.value) and isinstance(r.to_dict()["holds"], bool) for r in res.values())


def test_bootstrap_interval_resamples_whole_groups():
    lo, hi = premises.bootstrap_ci([(1, 0)] * 10, lambda g: float(np.mean([a - b for a, b in g])))
    assert lo == hi == 1.0  # every resample of identical paired groups gives the same gain
    lo, hi = premises.bootstrap_ci([(1, 0), (0, 0)] * 10, lambda g: float(np.mean([a - b for a, b in g])))
    assert 0.2 < lo < 0.5 < hi < 0.8


def test_premise_line_and_target_carry_the_interval():
    from diffnb.premises import Premise

    p = Premise("style_aligned_shape", 1.05, 0.9, {"sets": 6, "ci95_over_sets": [0.8, 1.3]})
    assert p.holds and p.interval == (0.8, 1.3)
    assert p.target == ">= 0.9 (95 % interval 0.80 to 1.30)" and "[0.80, 1.30]" in p.line()
    bare = Premise("x", 2.0, None, {"ci95_over_images": None})
    assert bare.interval is None and bare.target == "reported" and bare.holds is None
