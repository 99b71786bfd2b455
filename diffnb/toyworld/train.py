"""Train the toy model: `python -m diffnb.toyworld.train [--out build/toy_train] [--export diffnb/assets/toy]`.

Stages, each checkpointed under --out so that a stopped run resumes where it was:
  1. render the training split once (images + labels, .npz)
  2. train the VAE (AutoencoderKL, 64 px -> 16x16x4 latents)
  3. encode the data set to latents once (the UNet stage then never touches pixels)
  4. train UNet + CLIP text encoder on the latents (epsilon loss with min-SNR weighting, CFG dropout, EMA),
     optionally with a grounding loss on the cross-attention maps of the object words (see `grounding_loss`)
  5. export a StableDiffusionPipeline with save_pretrained (fp16 safetensors) + config + loss curve
Uses CUDA when available, else the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..processors import AttentionProcessor, patch_attention
from .data import ToyDataset
from .prompts import MAX_TOKENS, describe, max_tokens, write_word_tokenizer
from .world import BACKGROUNDS, COLORS, SHAPES, IMAGE_SIZE, TOY_WORLD, WORLDS, world_config

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
GROUNDED_RESOLUTIONS = (16, 8)  # the cross-attention maps the grounding loss supervises
GROUNDED_MAX_T = 500  # ... at timesteps below this one
PROMPT_DROPOUT = dict(p_empty=0.1, p_drop_shape=0.15, p_drop_color=0.25, p_drop_background=0.3)


def toy_components(tokenizer_dir: Path, n_tokens: int = MAX_TOKENS, transformer_layers: int = 1):
    """The toy model's architecture: SD1.5-shaped, small enough for a CPU. `n_tokens`: `prompts.max_tokens(world)`;
    `transformer_layers`: transformer blocks per attention (1: the shipped model; SD1.5 has 1, SDXL 2 and 10)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=n_tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=64))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, mid_block_add_attention=False, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, transformer_layers_per_block=transformer_layers)
    return tokenizer, text_encoder, vae, unet


def _slots(world: str) -> int:
    """Objects per row of the label / mask arrays: 2 (v1's layout) or the world's maximum."""
    return max(2, world_config(world).max_objects)


def render_dataset(path: Path, n: int, world: str = TOY_WORLD, masks_path: Path | None = None) -> dict:
    """Images (n, 64, 64, 3) and labels: [n_objects, background, (shape, colour, detail) per object slot];
    with `masks_path`, also the grounding masks of `object_masks` from the same renders."""
    if path.exists():
        return dict(np.load(path))
    ds, details = ToyDataset("train", length=n, world=world), world_config(world).details
    images, labels, masks = [], [], []
    for i in tqdm(range(n), desc="render"):
        r = ds[i]
        images.append(r.image)
        if masks_path is not None:
            masks.append(r.masks)
        o = r.scene.objects
        labels.append([len(o), BACKGROUNDS.index(r.scene.background)] + [
            v for k in range(_slots(world)) for v in ((SHAPES.index(o[k].shape), list(COLORS).index(o[k].color),
                                                       details.index(o[k].detail)) if k < len(o) else (-1, -1, -1))])
    data = dict(images=np.stack(images), labels=np.array(labels, dtype=np.int16))
    np.savez(path, **data)
    if masks_path is not None and not masks_path.exists():  # the same renders: no second pass over the split
        np.save(masks_path, np.stack([_cell_fractions(m, _slots(world)) for m in masks]))
    return data


def _cell_fractions(masks: np.ndarray, slots: int, size: int = IMAGE_SIZE // 4) -> np.ndarray:
    """(slots, size, size) float16: each object's visible area fraction per latent cell (zeros for a missing one)."""
    out, f = np.zeros((slots, size, size), np.float16), IMAGE_SIZE // size
    m = masks[:-1].astype(np.float32)
    out[:len(m)] = m.reshape(len(m), size, f, size, f).mean(axis=(2, 4))
    return out


def object_masks(path: Path, n: int, size: int = IMAGE_SIZE // 4, world: str = TOY_WORLD) -> np.ndarray:
    """(n, slots, size, size) float16: each object's visible area fraction per latent cell (zeros for a missing one)."""
    if path.exists():
        return np.load(path)
    ds = ToyDataset("train", length=n, world=world)
    out = np.zeros((n, _slots(world), size, size), np.float16)
    f = IMAGE_SIZE // size
    for i in tqdm(range(n), desc="masks"):
        m = ds[i].masks[:-1].astype(np.float32)
        out[i, :len(m)] = m.reshape(len(m), size, f, size, f).mean(axis=(2, 4))
    np.save(path, out)
    return out


class KeepCrossAttention(AttentionProcessor):
    """Keeps each call's head-averaged cross-attention probabilities, gradients attached, for the grounding loss."""
    needs_probs = True

    def __init__(self):
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def edit_probs(self, call, probs):
        self.maps.append(probs.mean(1))  # (B, N, T)
        return probs


def word_owners(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) index of the object each token names (its colour or shape word), -1 for every other token.

    Objects are counted along the prompt: "a red heart and a moon ..." -> red, heart: 0; moon: 1.
    """
    vocab = tokenizer.get_vocab()
    word_id = lambda w: vocab[w + "</w>"]
    object_words = torch.tensor([word_id(w) for w in (*SHAPES, *COLORS, "object")], device=ids.device)
    objects_before = torch.cumsum(ids == word_id("and"), dim=1)
    return torch.where(torch.isin(ids, object_words), objects_before, -1)


def grounding_loss(maps: list[torch.Tensor], owners: torch.Tensor, masks: torch.Tensor, keep: torch.Tensor):
    """Token-level grounding (TokenCompose, Wang et al. CVPR 2024): each object word's cross-attention map should
    put its mass inside that object's mask (token term) and cover it (pixel BCE term).

    maps: (B, N, T) per layer; owners: (B, T) from `word_owners`; masks: (B, 2, S, S) area fractions at the
    largest map size; keep: (B,) samples to supervise (low noise: at high noise the layout is not yet decided).
    Returns (token term, pixel term), averaged over supervised (sample, word) pairs and layers.
    """
    sel = (owners >= 0) & keep[:, None]
    if not sel.any():
        zero = maps[0].sum() * 0
        return zero, zero
    b, t = sel.nonzero(as_tuple=True)
    token, pixel = 0.0, 0.0
    for m in maps:
        side = math.isqrt(m.shape[1])
        target = F.adaptive_avg_pool2d(masks.float(), side).flatten(2)[b, owners[b, t]]  # (K, N)
        a = m[b, :, t]  # (K, N)
        token = token + ((1 - (a * target).sum(-1) / a.sum(-1).clamp_min(1e-6)) ** 2).mean()
        pixel = pixel + F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), (target > 0.5).float())
    return token / len(maps), pixel / len(maps)


def prompts_from_labels(labels: np.ndarray, rng: np.random.Generator, world: str = TOY_WORLD) -> list[str]:
    """Training prompts with attribute dropout, rebuilt from the stored labels."""
    from .world import Obj, Scene

    details, out = world_config(world).details, []
    for row in labels:
        if rng.random() < PROMPT_DROPOUT["p_empty"]:
            out.append("")
            continue
        objs = [Obj(SHAPES[row[2 + 3 * k]], list(COLORS)[row[3 + 3 * k]], details[row[4 + 3 * k]]) for k in range(row[0])]
        scene = Scene(objs, background=BACKGROUNDS[row[1]], world=world)
        out.append(describe(scene, rng, **{k: v for k, v in PROMPT_DROPOUT.items() if k != "p_empty"}))
    return out


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def atomic_save(obj, path: Path):
    """torch.save through a temporary file: a stop mid-save never corrupts the checkpoint."""
    torch.save(obj, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def save_state(path: Path, step: int, extra: dict | None = None, **objs):
    atomic_save({"step": step, **{k: v.state_dict() for k, v in objs.items()}, **(extra or {})}, path)


def train_vae(vae, data, args, device, log):
    ckpt = args.out / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"])
        start = state["step"]
    rng = np.random.default_rng(start)
    vae.train()
    for step in tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps):
        x = to_tensor(data["images"][rng.integers(len(data["images"]), size=args.batch)], device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, loss.item())
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vae_steps:
            save_state(ckpt, step + 1, vae=vae, opt=opt)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, data, path: Path, device) -> np.ndarray:
    if path.exists():
        return np.load(path)
    out = []
    for i in tqdm(range(0, len(data["images"]), 256), desc="encode"):
        out.append(vae.encode(to_tensor(data["images"][i:i + 256], device)).latent_dist.mean.cpu())
    lat = torch.cat(out).numpy()
    np.save(path, lat)
    return lat


def train_unet(unet, text_encoder, tokenizer, latents, labels, args, device, log, masks=None):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    ckpt = args.out / "unet.pt"
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    start, grounding_from = 0, None
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema = [t.to(device) for t in state["ema"]]
        start = state["step"]
        grounding_from = state.get("grounding_from")
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    rng = np.random.default_rng(1000 + start)
    lat_t = torch.from_numpy(latents)
    grounded = args.grounding > 0 and masks is not None
    if grounded and grounding_from is None:
        grounding_from = start
    args.grounding_from = grounding_from  # the model card says from which step the attention was supervised
    keeper = KeepCrossAttention()
    patched = patch_attention(unet, {f"cross@{r}": keeper for r in GROUNDED_RESOLUTIONS}) if grounded \
        else contextlib.nullcontext()
    unet.train(), text_encoder.train()
    args.trained_unet_steps = max(start, args.unet_steps)  # an export of a later checkpoint keeps its own step
    with patched:
        for step in tqdm(range(start, args.unet_steps), desc="unet", initial=start, total=args.unet_steps):
            idx = rng.integers(len(lat_t), size=args.batch)
            x0 = lat_t[idx].to(device) * args.scaling_factor
            ids = tokenizer(prompts_from_labels(labels[idx], rng, args.world), padding="max_length",
                            max_length=max_tokens(args.world),
                            truncation=True, return_tensors="pt").input_ids.to(device)
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (len(x0),), device=device)
            xt = sched.add_noise(x0, noise, t)
            keeper.maps.clear()
            pred = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
            weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 (Hang et al. 2023): faster convergence
            loss = denoise = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            if grounded:
                token, pixel = grounding_loss(keeper.maps, word_owners(ids, tokenizer),
                                              torch.from_numpy(masks[idx]).to(device), t < GROUNDED_MAX_T)
                loss = loss + args.grounding * (token + 0.5 * pixel)
                log("grounding", step, token.item())
            if args.cooldown_from is not None and step >= args.cooldown_from:  # linear decay to 0 at the last step
                for g in opt.param_groups:
                    g["lr"] = args.lr * (args.unet_steps - step) / max(1, args.unet_steps - args.cooldown_from)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - decay)
            log("unet", step, denoise.item())
            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.unet_steps:
                save_state(ckpt, step + 1, {"ema": [e.cpu() for e in ema], "grounding_from": grounding_from},
                           unet=unet, text=text_encoder, opt=opt)
    with torch.no_grad():  # export the EMA weights
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval(), text_encoder.eval()


def retokenize_checkpoint(ckpt: Path, old_dir: Path, new_dir: Path):
    """Carry a UNet-stage checkpoint across a tokenizer change instead of retraining from scratch.

    Each new token's embedding row (and its EMA and Adam moments) starts as the mean of the rows of the pieces
    the old tokenizer split that string into; training then adapts it.
    """
    from transformers import CLIPTokenizer

    old, new = CLIPTokenizer.from_pretrained(old_dir), CLIPTokenizer.from_pretrained(new_dir)
    old_vocab = old.get_vocab()
    sources = [[old_vocab[tok]] if tok in old_vocab else old(tok.removesuffix("</w>"), add_special_tokens=False).input_ids
               for tok, _ in sorted(new.get_vocab().items(), key=lambda kv: kv[1])]
    state = torch.load(ckpt, map_location="cpu")
    key = next(k for k in state["text"] if k.endswith("token_embedding.weight"))
    old_shape = state["text"][key].shape
    remap = lambda rows: torch.stack([rows[ids].mean(0) for ids in sources])
    state["text"][key] = remap(state["text"][key])
    ema = [i for i, t in enumerate(state["ema"]) if t.shape == old_shape]
    moments = [s for s in state["opt"]["state"].values() if s["exp_avg"].shape == old_shape]
    if len(ema) != 1 or len(moments) != 1:
        raise ValueError(f"cannot find the unique token embedding of shape {tuple(old_shape)} in {ckpt}")
    state["ema"][ema[0]] = remap(state["ema"][ema[0]])
    for name in ("exp_avg", "exp_avg_sq"):
        moments[0][name] = remap(moments[0][name])
    atomic_save(state, ckpt)
    print(f"retokenized {ckpt}: vocabulary {old_shape[0]} -> {len(sources)}")


def warm_start(unet, text_encoder, tok_dir: Path, args, load: bool = True):
    """Load an exported pipeline's UNet and text encoder (same world, tokenizer and architecture) as the starting
    weights. The optimizer and EMA start afresh (an export holds neither), so a warm start is a new run on top of
    the old one: `args.init_steps` records how many steps the starting weights had."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = Path(args.init_from)
    if not (src / "unet" / "config.json").exists():
        raise ValueError(f"--init-from {src}: not an exported pipeline (no unet/config.json)")
    from .evaluate import model_world

    if (world := model_world(src)) != args.world:
        raise ValueError(f"--init-from {src} was trained on world {world!r}, not {args.world!r}")
    cfg = json.loads((src / "training_config.json").read_text())["args"]
    if CLIPTokenizer.from_pretrained(src / "tokenizer").get_vocab() != CLIPTokenizer.from_pretrained(tok_dir).get_vocab():
        raise ValueError(f"--init-from {src}: its tokenizer differs from this run's")
    args.init_from = str(src.resolve())
    args.init_steps = cfg.get("init_steps", 0) + cfg.get("trained_unet_steps", cfg["unet_steps"])
    if not load:  # resuming this run's own checkpoint: only the record
        return
    for model, loaded in ((unet, UNet2DConditionModel.from_pretrained(src / "unet")),
                          (text_encoder, CLIPTextModel.from_pretrained(src / "text_encoder"))):
        model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})  # a shape mismatch raises
    print(f"warm start from {src}: {args.init_steps} steps already trained")


def export(tokenizer, text_encoder, vae, unet, args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=args.scaling_factor)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu", torch.float16).save_pretrained(args.export, safe_serialization=True)
    pipe.to(torch.float32)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (Path(args.export) / "training_config.json").write_text(json.dumps(
        {"args": cfg, "scheduler": SCHEDULER_CONFIG, "prompt_dropout": PROMPT_DROPOUT}, indent=1))
    print(f"exported to {args.export}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/toy_train"))
    p.add_argument("--export", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "toy")
    p.add_argument("--n-images", type=int, default=30_000)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--cooldown-from", type=int, default=None,
                   help="decay the learning rate linearly from this UNet step to 0 at --unet-steps")
    p.add_argument("--grounding", type=float, default=0.01,
                   help="weight of the cross-attention grounding loss (0: plain denoising loss)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default=TOY_WORLD, choices=tuple(WORLDS),
                   help=f"which world variant to train on (diffnb.toyworld.world.WORLDS; {TOY_WORLD}: the shipped model's)")
    p.add_argument("--transformer-layers", type=int, default=1,
                   help="transformer blocks per attention in the UNet (1: the shipped model)")
    p.add_argument("--vae-worlds", default=None,
                   help="comma-separated worlds whose renders (--n-images split evenly) train the VAE instead of "
                        "--world's: one VAE shared by several worlds' pilots")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse this trained AutoencoderKL folder (e.g. diffnb/assets/toy/vae) instead of training one: "
                        "for worlds whose images are of the same kind, so a fixed budget goes to the UNet")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start the UNet and text encoder from this exported pipeline (e.g. a pilot's) instead of from "
                        "scratch: a warm start that continues a run across machines without its optimizer state")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    args.out.mkdir(parents=True, exist_ok=True)
    n_tokens = max_tokens(args.world)
    tok_dir, fresh = args.out / "tokenizer", write_word_tokenizer(args.out / "tokenizer.new", max_length=n_tokens)
    if tok_dir.exists() and (tok_dir / "vocab.json").read_text() != (fresh / "vocab.json").read_text():
        if (args.out / "unet.pt").exists():
            retokenize_checkpoint(args.out / "unet.pt", tok_dir, fresh)
        shutil.rmtree(tok_dir)
    if not tok_dir.exists():
        fresh.rename(tok_dir)
    shutil.rmtree(fresh, ignore_errors=True)
    tokenizer, text_encoder, vae, unet = toy_components(tok_dir, n_tokens, args.transformer_layers)
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from).float()
        vae.requires_grad_(False)
        args.vae_from = str(args.vae_from.resolve())
    if args.init_from is not None:  # recorded on resume too; the weights only when there is no checkpoint yet
        warm_start(unet, text_encoder, tok_dir, args, load=not (args.out / "unet.pt").exists())
    for m in (text_encoder, vae, unet):
        m.to(device)
    log_file = open(args.out / "loss.csv", "a")
    last = {}

    def log(stage, step, value):
        last[stage] = 0.98 * last.get(stage, value) + 0.02 * value
        if step % 10 == 0:
            log_file.write(f"{stage},{step},{value:.5f},{last[stage]:.5f},{time.time():.0f}\n")
            log_file.flush()

    vae_only = args.unet_steps == 0 and args.vae_worlds
    data = None if vae_only else render_dataset(args.out / "data.npz", args.n_images, args.world,
                                                args.out / "masks16.npy" if args.grounding > 0 else None)
    if args.vae_from is None:
        vae_data = data
        if args.vae_worlds:
            worlds = args.vae_worlds.split(",")
            parts = [render_dataset(args.out / f"vae_data_{w}.npz", args.n_images // len(worlds), w) for w in worlds]
            vae_data = {"images": np.concatenate([d["images"] for d in parts])}
        train_vae(vae, vae_data, args, device, log)
    vae.eval()
    if args.unet_steps == 0:  # a VAE-only run: export it (with an untrained UNet) and stop
        args.scaling_factor = 1.0
        export(tokenizer, text_encoder, vae, unet, args)
        return
    latents = encode_latents(vae, data, args.out / "latents.npy", device)
    args.scaling_factor = float(1.0 / latents.std())
    masks = object_masks(args.out / "masks16.npy", args.n_images, world=args.world) if args.grounding > 0 else None
    train_unet(unet, text_encoder, tokenizer, latents, data["labels"], args, device, log, masks)
    export(tokenizer, text_encoder, vae, unet, args)


if __name__ == "__main__":
    main()
