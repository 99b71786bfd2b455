import json
import numpy as np
import pytest
from transformers import CLIPTokenizer

from diffnb.toyworld import BACKGROUNDS, KEYPOINTS, SHAPES, Obj, Scene, ToyDataset, describe, prompt, random_scene, render
from diffnb.toyworld.prompts import MAX_TOKENS, WORDS, write_word_tokenizer


def test_render_ground_truth_is_consistent():
    r = render(Scene([Obj("heart", "red", "dot", center=(32, 32), radius=18, angle=0.0)], background="striped",
                     world="v1"))
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


# --- world variants (issue 17, toy world v2) -------------------------------------------------------------------
V1_FINGERPRINT = "65765f96"  # sha256 prefix of v1 renders (train 0..19): v1 stays bit-identical for the shipped model


def _fingerprint(world="v1", n=20):
    import hashlib

    h, ds = hashlib.sha256(), ToyDataset("train", n, world=world)
    for i in range(n):
        r = ds[i]
        h.update(r.image.tobytes()), h.update(r.masks.tobytes()), h.update(repr(r.keypoints).encode())
    return h.hexdigest()[:8]


def test_v1_world_is_unchanged():
    assert _fingerprint() == V1_FINGERPRINT


def test_the_default_world_is_the_shipped_models_and_its_probes():
    """Every default `world` is TOY_WORLD, so it must be the world the shipped model and probes were trained on."""
    from diffnb.models import TOY_DIR
    from diffnb.toyworld.evaluate import model_world
    from diffnb.toyworld.probes import PROBE_FILE, probe_world
    from diffnb.toyworld.world import TOY_WORLD

    assert model_world(TOY_DIR) == TOY_WORLD == probe_world(PROBE_FILE)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert random_scene(rng_a) == random_scene(rng_b, world=TOY_WORLD)
    assert ToyDataset("heldout", 1).world == TOY_WORLD


@pytest.mark.parametrize("world", ["texture", "pattern", "multi", "v2"])
def test_world_variants_keep_exact_ground_truth(world):
    from diffnb.toyworld.world import COLORS, WORLDS

    cfg = WORLDS[world]
    ds, counts = ToyDataset("heldout", 40, world=world), set()
    for i in range(40):
        r = ds[i]
        objs = r.scene.objects
        counts.add(len(objs))
        assert r.masks.shape == (len(objs) + 1, 64, 64)
        assert (r.masks.sum(0) == 1).all()  # a partition: every pixel has exactly one owner
        assert all(m.any() for m in r.masks[:-1])  # every object is visible
        for k, o in enumerate(objs):
            assert o.detail in cfg.details
            # interior pixels (away from the silhouette's anti-aliased edge) are the object's colour scaled by a
            # shade between its identity's darkest and 1: nothing of the background shows through the mask
            m = r.masks[k]
            core = np.all([m[1 + dy:63 + dy, 1 + dx:63 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
            px = r.image[1:-1, 1:-1][core].astype(float)
            colour = np.array(COLORS[o.color], dtype=float)
            shade = px @ colour / (colour @ colour)
            darkest = 0.45 if cfg.identity == "pattern" else 0.35
            assert (np.abs(px - shade[:, None] * colour).max(1) <= 4).all()
            assert ((shade > darkest - 0.02) & (shade < 1.01)).all()
            for x, y, visible in r.keypoints[k].values():  # keypoints still valid: visible ones lie on the object
                if visible:
                    assert m[int(y), int(x)]
    assert max(counts) == cfg.max_objects or cfg.max_objects == 2


def test_pattern_identity_covers_the_object_and_texture_is_local():
    from diffnb.toyworld.world import PATTERNS

    base = dict(center=(32, 32), radius=20, angle=0.3)
    shaded = {}
    for p in PATTERNS:
        r = render(Scene([Obj("square", "red", p, **base)], world="pattern"))
        m = r.masks[0]
        dark = m & (r.image[..., 0] < 150)
        shaded[p] = dark.sum() / m.sum()
        if p != "none":  # the pattern reaches every quarter of the object, not one small mark
            ys, xs = np.nonzero(m)
            cy, cx = ys.mean(), xs.mean()
            for qy in (ys < cy, ys >= cy):
                for qx in (xs < cx, xs >= cx):
                    assert dark[ys[qy & qx], xs[qy & qx]].mean() > 0.1
    assert shaded["none"] == 0 and min(shaded["spots"], shaded["stripes"]) > 0.15
    with pytest.raises(ValueError):
        Scene([Obj("square", "red", "dot")], world="pattern")  # v1's mark names are not this world's
    # texture: the same style and seed renders the same; another seed moves the texture; no global period
    one = lambda seed, bg="striped": render(Scene([Obj("circle", "red", center=(8, 8), radius=4)], background=bg,
                                                  world="texture", bg_seed=seed)).image
    assert np.array_equal(one(3), one(3)) and not np.array_equal(one(3), one(4))
    for bg in ("striped", "checkered", "dotted"):
        img = one(7, bg).astype(int)
        a = img[24:40, 24:40]  # no other patch is a copy of this one (in v1 the one a period away is)
        others = [np.abs(img[24 + dy:40 + dy, 24 + dx:40 + dx] - a).mean()
                  for dy in range(-20, 21, 2) for dx in range(-20, 21, 2) if max(abs(dy), abs(dx)) >= 6]
        assert min(others) > 3, bg
    with pytest.raises(ValueError):
        random_scene(np.random.default_rng(0), world="v3")


def test_three_object_prompts_fit_and_training_labels_round_trip(tmp_path):
    from diffnb.toyworld.prompts import max_tokens
    from diffnb.toyworld.train import prompts_from_labels, render_dataset

    tok = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, max_length=max_tokens("multi")))
    s = Scene([Obj("triangle", "purple"), Obj("triangle", "purple"), Obj("triangle", "purple")],
              background="checkered", world="multi")
    assert len(tok(describe(s)).input_ids) <= max_tokens("multi") and max_tokens("v1") == MAX_TOKENS
    with pytest.raises(ValueError):
        Scene([Obj("heart", "red")] * 3, world="v1")  # v1 holds at most two
    data = render_dataset(tmp_path / "d.npz", 12, world="v2")
    assert data["labels"].shape == (12, 2 + 3 * 3)
    ds = ToyDataset("train", 12, world="v2")
    texts = prompts_from_labels(data["labels"], np.random.default_rng(0), "v2")
    for i, row in enumerate(data["labels"]):
        assert row[0] == len(ds[i].scene.objects)
    assert all(isinstance(t, str) for t in texts)


def test_pilot_training_path_reuses_the_vae_and_exports_a_loadable_pipeline(tmp_path):
    """What pilots/run_pilot.py runs, at toy sizes: a world variant, the shipped VAE reused (not retrained), two
    transformer blocks, a fixed number of steps, checkpoint, resume, export, load."""
    from pathlib import Path

    import torch

    from diffnb.premises import load_folder
    from diffnb.toyworld.train import main

    vae = Path(__file__).resolve().parents[1] / "diffnb" / "assets" / "toy" / "vae"
    if not (vae / "config.json").exists():
        pytest.skip("no shipped VAE")
    argv = ["--out", str(tmp_path / "run"), "--export", str(tmp_path / "export"), "--world", "multi", "--vae-from",
            str(vae), "--n-images", "24", "--batch", "4", "--ckpt-every", "1", "--transformer-layers", "2", "--threads", "1"]
    main(argv + ["--unet-steps", "1"])
    assert torch.load(tmp_path / "run" / "unet.pt", map_location="cpu")["step"] == 1 and not (tmp_path / "run" / "vae.pt").exists()
    main(argv + ["--unet-steps", "2"])  # resumes at step 1
    assert torch.load(tmp_path / "run" / "unet.pt", map_location="cpu")["step"] == 2
    pipe = load_folder(tmp_path / "export")
    assert pipe.unet.config.transformer_layers_per_block == 2 and pipe.tokenizer.model_max_length == 20
    img = pipe(["a red heart and a blue moon and a green circle on a dotted background"], num_inference_steps=2,
               output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_vae_only_run_on_several_worlds(tmp_path):
    """The shared pilot VAE: trained on renders of several worlds, exported alone (no UNet data rendered)."""
    from diffnb.toyworld.train import main

    main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "export"), "--world", "v2", "--vae-worlds",
          "v1,texture", "--vae-steps", "1", "--unet-steps", "0", "--n-images", "8", "--batch", "2", "--grounding", "0",
          "--threads", "1"])
    assert (tmp_path / "export" / "vae" / "config.json").exists() and not (tmp_path / "run" / "data.npz").exists()
    assert {p.name for p in (tmp_path / "run").glob("vae_data_*.npz")} == {"vae_data_v1.npz", "vae_data_texture.npz"}


def test_warm_start_continues_an_exported_pipeline(tmp_path):
    """--init-from: a new run starts from an export's UNet and text encoder (not from scratch), records how many steps
    they had, and refuses an export of another world."""
    from pathlib import Path

    import torch

    from diffnb.premises import load_folder
    from diffnb.toyworld.train import main

    vae = Path(__file__).resolve().parents[1] / "diffnb" / "assets" / "toy" / "vae"
    if not (vae / "config.json").exists():
        pytest.skip("no shipped VAE")
    common = ["--world", "multi", "--vae-from", str(vae), "--n-images", "16", "--batch", "2", "--threads", "1",
              "--unet-steps", "1"]
    main(["--out", str(tmp_path / "a"), "--export", str(tmp_path / "ea")] + common)
    first = load_folder(tmp_path / "ea").unet.state_dict()
    main(["--out", str(tmp_path / "b"), "--export", str(tmp_path / "eb"), "--init-from", str(tmp_path / "ea"),
          "--lr", "0"] + common)  # lr 0: the weights must come out as they went in
    second = load_folder(tmp_path / "eb").unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    cfg = json.loads((tmp_path / "eb" / "training_config.json").read_text())["args"]
    assert cfg["init_steps"] == 1 and cfg["init_from"] == str((tmp_path / "ea").resolve())
    main(["--out", str(tmp_path / "b"), "--export", str(tmp_path / "eb"), "--init-from", str(tmp_path / "ea"),
          "--lr", "0"] + common)  # again: resumes its own checkpoint (exports it) and keeps the record
    assert json.loads((tmp_path / "eb" / "training_config.json").read_text())["args"]["init_steps"] == 1
    with pytest.raises(ValueError, match="world 'multi', not 'v2'"):
        main(["--out", str(tmp_path / "c"), "--export", str(tmp_path / "ec"), "--init-from", str(tmp_path / "ea"),
              "--world", "v2", "--vae-from", str(vae), "--n-images", "8", "--batch", "2", "--unet-steps", "1"])
