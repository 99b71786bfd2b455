"""Diffusion Hyperfeatures on the toy model: does the learned aggregation beat single layers? (CPU, one thread)

Toy keypoint pairs (heart / triangle, different rotation, scale, colour, background); features of every decoder
resnet along a DDIM inversion at notebook 03's saved steps; the aggregator trains for a fixed number of steps on
every same-class pair of the training images (`cross_pairs`; `--no-cross`: the listed pairs only), their 2-4 named
keypoints plus `--extra-points` matched object points (see `keypoint_pairs`), with the official objective.
PCK@0.1 (bbox) on the named keypoints of held-out pairs for hyperfeatures and the paper's baselines (best single
layer chosen on the train pairs, concat-all, the one-step model at the clean call) plus a colour-patch baseline;
each step of the paper's ordering with a 95 % interval over held-out pairs. Seed 1 by default: pairs notebook 03
(seed 0) never sees.

    python benchmarks/hyperfeatures_toy.py     # -> benchmarks/results/hyperfeatures_toy.json
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from diffnb.bench import save_result
from diffnb.models import load_pipeline
from diffnb.papers import hyperfeatures as hf, hyperfeatures_eval as hfe, hyperfeatures_train as hft
from diffnb.toyworld.scoring import keypoint_pairs

OUT = Path(__file__).resolve().parent / "results"


def train(data, args):
    torch.manual_seed(args.seed)
    net = hf.AggregationNetwork.for_features(data.features, projection_dim=args.projection_dim,
                                             output_size=args.output_size)
    losses = hft.train_aggregator(net, data, steps=args.train_steps, lr=args.lr, batch_pairs=args.batch_pairs,
                                 weight_decay=args.weight_decay, seed=args.seed)
    return net, losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--inversion-steps", type=int, default=20)
    p.add_argument("--saved-steps", type=int, default=5, help="evenly spaced, both ends (when --steps is empty)")
    p.add_argument("--steps", default="0,5,10", help="saved step indices (notebook 03's toy setting); 0 = clean call")
    p.add_argument("--extra-points", type=int, default=32, help="matched object points added to training pairs")
    p.add_argument("--projection-dim", type=int, default=64)
    p.add_argument("--output-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-pairs", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=1000, help="training steps of each aggregator (one pair a step)")
    p.add_argument("--max-angle", type=float, default=0.785, help="rotation of each image, +- radians")
    p.add_argument("--seed", type=int, default=1, help="pairs and initialisation; notebook 03 uses seed 0")
    p.add_argument("--cross", action=argparse.BooleanOptionalAction, default=True,
                   help="train on every same-class pair of the training images (hyperfeatures_train.cross_pairs); "
                        "--no-cross: only the listed pairs")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--cache", default="", help="torch.save the extracted features here / reuse them")
    p.add_argument("--out", default="hyperfeatures_toy.json", help="file name under benchmarks/results")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    train_pairs = keypoint_pairs(a.train, "train", seed=a.seed, max_angle=a.max_angle)
    test_pairs = keypoint_pairs(a.test, "heldout", seed=a.seed, max_angle=a.max_angle)
    steps = [int(x) for x in a.steps.split(",")] if a.steps else hf.spaced_steps(a.inversion_steps, a.saved_steps)
    dense_pairs = keypoint_pairs(a.train, "train", seed=a.seed, max_angle=a.max_angle, extra_points=a.extra_points)
    if a.cache and Path(a.cache).exists():
        tr_f, te_f = torch.load(a.cache, weights_only=False)
    else:
        pipe = load_pipeline("toy", device="cpu")
        kw = dict(num_inference_steps=a.inversion_steps, steps=steps, batch_size=16)
        tr_f = hft.pair_features(pipe, train_pairs, **kw).features
        te_f = hft.pair_features(pipe, test_pairs, **kw).features
        if a.cache:
            torch.save((tr_f, te_f), a.cache)
    tr_f, te_f = tr_f.select(steps=steps), te_f.select(steps=steps)  # a cache may hold more steps
    tr, te = hft.PairFeatures(train_pairs, tr_f), hft.PairFeatures(test_pairs, te_f)
    dense = hft.PairFeatures(dense_pairs, tr_f)  # same images, more matched points: training only
    if a.cross:
        dense = hft.cross_pairs(dense)
    t_extract = time.perf_counter() - t0

    t1 = time.perf_counter()
    net, losses = train(dense, a)
    t_train = time.perf_counter() - t1
    hits = {}

    def held_out(name, predictions):  # PCK on the held-out pairs, per-pair hits kept for the intervals
        hits[name] = hfe.pair_hits(predictions, test_pairs)
        return hfe.score(predictions, test_pairs)

    res = {"hyperfeatures": held_out("hyperfeatures", hfe.predict(hf.describe(net, te.features), test_pairs)),
           "hyperfeatures_train": hfe.evaluate(hf.describe(net, tr.features), train_pairs)}

    sweep = hfe.sweep_layers(tr)
    layer, step = max(sweep, key=sweep.get)
    res["best_single_layer"] = {**held_out("best_single_layer", hfe.predict(
        hfe.layer_descriptors(te.features, layer, step), test_pairs)),
        "layer": layer, "step": step, "train_pck_bbox": sweep[(layer, step)]}
    res["concat_all"] = held_out("concat_all", hfe.concat_predict(te.features, test_pairs))
    one = hft.PairFeatures(dense_pairs, tr.features.select(steps=[0]))
    one = hft.cross_pairs(one) if a.cross else one
    net1, _ = train(one, a)  # the paper's one-step model (the clean call), same number of steps
    res["one_timestep"] = {**held_out("one_timestep", hfe.predict(
        hf.describe(net1, te.features.select(steps=[0])), test_pairs)), "step": 0}
    res["pixel"] = held_out("pixel", hfe.predict(hfe.pixel_descriptors(hft.pair_images(test_pairs)), test_pairs))
    # the ordering hyperfeatures > one timestep > best single layer > pixel, each step with its interval over pairs
    order = ("hyperfeatures", "one_timestep", "best_single_layer", "pixel")
    res["gains"] = {f"{a_} - {b_}": hfe.pck_gain(hits[a_], hits[b_]) for a_, b_ in zip(order, order[1:])}

    w = net.mixing_weights().detach()
    report = {"settings": vars(a), "saved_steps": steps, "timesteps": tr.features.timesteps,
              "layers": tr.features.layers, "results": res, "mixing_weights": w.tolist(),
              "train_steps": len(losses), "loss_first_50": sum(losses[:50]) / 50, "loss_last_50": sum(losses[-50:]) / 50,
              "seconds": {"extract": t_extract, "train": t_train, "total": time.perf_counter() - t0}}
    print(f"PCK@0.1 (bbox) on {a.test} held-out pairs ({res['hyperfeatures']['n']} keypoints):")
    for k in ("hyperfeatures", "best_single_layer", "concat_all", "one_timestep", "pixel"):
        print(f"  {k:18s} {100 * res[k]['pck_bbox']:5.1f}   (img: {100 * res[k]['pck_img']:5.1f})")
    print(f"  best single layer: {layer} at step {step} (train {100 * sweep[(layer, step)]:.1f})")
    print(f"  train pairs, hyperfeatures: {100 * res['hyperfeatures_train']['pck_bbox']:.1f}")
    for k, g in res["gains"].items():
        print(f"  {k:34s} {g['gain']:+5.1f} points, 95 % interval over {g['pairs']} pairs [{g['low']:+.1f}, {g['high']:+.1f}]")
    print(f"loss {report['loss_first_50']:.3f} -> {report['loss_last_50']:.3f} in {len(losses)} steps; "
          f"times {json.dumps({k: round(v, 1) for k, v in report['seconds'].items()})}")
    print("mixing weights (steps x layers):\n", w.numpy().round(3))
    save_result(report, OUT / a.out)


if __name__ == "__main__":
    main()
