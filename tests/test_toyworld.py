import numpy as np
import pytest
from transformers import CLIPTokenizer

from diffnb.toyworld import BACKGROUNDS, KEYPOINTS, SHAPES, Obj, Scene, ToyDataset, describe, prompt, random_scene, render
from diffnb.toyworld.prompts import MAX_TOKENS, WORDS, write_word_tokenizer


def test_render_ground_truth_is_consistent():
    r = render(Scene([Obj("heart", "red", "dot", center=(32, 32), radius=18, angle=0.0)], background="striped"))
    assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
    assert r.masks.shape == (2, 64, 64)
    assert not (r.masks[0] & r.masks[1]).any() and (r.masks[0] | r.masks[1]).all()
    red = r.image[r.masks[0]]
    assert (np.abs(red.astype(int) - (220, 40, 40)).sum(1) < 30).mean() > 0.6  # mostly the object's colour
    kp = r.keypoints[0]
    assert set(kp) == set(KEYPOINTS["heart"]) and all(v for _, _, v in kp.values())
    assert kp["tip"][1] > kp["left_lobe"][1]  # tip below the lobes when upright (y down)
    assert kp["left_lobe"][0] < kp["right_lobe"][0]


def test_keypoints_follow_rotation():
    up = render(Scene([Obj("moon", "blue", center=(32, 32), radius=18, angle=0.0)])).keypoints[0]
    turned = render(Scene([Obj("moon", "blue", center=(32, 32), radius=18, angle=np.pi / 2)])).keypoints[0]
    # a quarter turn counter-clockwise moves the back (left of centre) to below the centre (y down)
    assert up["back"][0] < 32 - 10 and turned["back"][1] > 32 + 10


def test_occluded_keypoints_are_invisible():
    a = Obj("triangle", "red", center=(32, 32), radius=18)
    b = Obj("square", "green", center=(32, 32), radius=30)  # drawn on top, covers everything
    r = render(Scene([a, b]))
    assert not any(v for _, _, v in r.keypoints[0].values())


def test_dataset_is_deterministic_and_splits_differ():
    a, b = ToyDataset("train", 5), ToyDataset("train", 5)
    assert np.array_equal(a[3].image, b[3].image)
    assert not np.array_equal(a[3].image, ToyDataset("heldout", 5)[3].image)
    with pytest.raises(ValueError):
        ToyDataset("test")
    with pytest.raises(IndexError):
        a[5]


def test_random_scene_fixed_attributes_and_errors():
    rng = np.random.default_rng(0)
    s = random_scene(rng, n_objects=1, shape="moon", background="dotted")
    assert s.objects[0].shape == "moon" and s.background == "dotted"
    with pytest.raises(ValueError):
        random_scene(rng, size_of_thing=3)
    with pytest.raises(ValueError):
        Scene([Obj("star", "red")])
    with pytest.raises(ValueError):
        Scene([])


def test_prompts_and_word_tokenizer(tmp_path):
    s = Scene([Obj("heart", "red"), Obj("moon", "blue")], background="dotted")
    assert describe(s) == "a red heart and a blue moon on a dotted background"
    assert prompt("moon") == "a moon" and prompt(color="red") == "a red object"
    with pytest.raises(ValueError):
        prompt("star")
    rng = np.random.default_rng(0)
    dropped = {describe(s, rng, p_drop_background=0.5) for _ in range(40)}
    assert len(dropped) == 2
    tok = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path))
    for w in WORDS:  # every grammar word survives a round trip (no unknown tokens)
        assert tok.decode(tok(w, add_special_tokens=False).input_ids).strip() == w
    longest_single = "a purple triangle on a checkered background"
    assert len(tok(longest_single).input_ids) <= MAX_TOKENS


def test_every_word_is_one_token(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path))
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in WORDS)


def test_word_owners_count_objects_along_the_prompt(tmp_path):
    from diffnb.toyworld.train import word_owners

    tok = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path))
    texts = ["a red heart and a moon on a dotted background", "a green object", ""]
    ids = tok(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    owners = word_owners(ids, tok)
    for text, row, own in zip(texts, ids, owners):
        named = {tok.decode([i]).strip(): int(o) for i, o in zip(row, own) if o >= 0}
        expected = {"a red heart and a moon on a dotted background": {"red": 0, "heart": 0, "moon": 1},
                    "a green object": {"green": 0, "object": 0}, "": {}}[text]
        assert named == expected


def test_grounding_loss_rewards_attention_inside_the_mask():
    import torch

    from diffnb.toyworld.train import grounding_loss

    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :8, :8] = 1  # object 0 in the top-left quarter
    owners = torch.tensor([[-1, 0, -1]])
    inside = torch.zeros(1, 256, 3)
    inside[0, :, 0] = 1.0
    inside.view(1, 16, 16, 3)[0, :8, :8] = torch.tensor([0.0, 1.0, 0.0])  # token 1 owns exactly its mask
    spread = torch.full((1, 256, 3), 1 / 3)
    keep = torch.tensor([True])
    tok_in, pix_in = grounding_loss([inside], owners, masks, keep)
    tok_sp, pix_sp = grounding_loss([spread], owners, masks, keep)
    assert tok_in < 1e-6 < 0.5 < tok_sp and pix_in < 1e-3 < pix_sp
    tok8, _ = grounding_loss([inside, inside.view(1, 16, 16, 3)[:, ::2, ::2].reshape(1, 64, 3)], owners, masks, keep)
    assert tok8 < 1e-6  # the 8x8 map is scored against the pooled mask
    zero_tok, zero_pix = grounding_loss([spread], owners, masks, torch.tensor([False]))
    assert zero_tok == 0 and zero_pix == 0
