"""Captioner training throughput on this machine (XE and both SCST forms), printed as JSON.

One optimisation step = the loop body of ray_updown/captioning/train.py on one worker (loss,
backward, optimizer step), on random region features and captions of the stated sizes:

- "paper": E = 1000, H = 512, M = 1000, 10,010 words, 36 regions x 2048-d, 16 words max;
- "small": E = H = M = 256, 2,000 words, 36 regions x 2048-d.

XE steps hold `images` images x 5 captions; SCST steps decode 5 candidates per image (the
beam of 5, or 5 samples + the greedy baseline) and re-score them. Every caption is 16 words
+ EOS, the maximum: an untrained model's beams would end after a word or two, so its EOS
logit is biased to -30 and candidates run to max_len. Real captions (~10 words) are ~1.5x
faster. Rates are captions per second: XE counts target captions, SCST candidate captions.
Then the CIDEr-D part (benchmarks/cider.py): our CIDEr-D against pycocoevalcap's on
synthetic COCO-like captions, and the reward's share of an SCST step.

Then where the features live while training (captioning/data.py over features/regions.py),
on a synthetic store of 36 x 2048 float16 regions per image and a Karpathy file of 5 random
captions per image:
* loader throughput: shuffled images/s of the training loader (`make_loader`, whole
  CaptionBatches) with 0, 2 and N loader processes, from the store reader and the shared copy;
* PSS (/proc/<pid>/smaps_rollup, not RSS) of 1 and 4 concurrent trial processes, each
  gathering every image and taking two XE steps of the "small" model, mapping the node's one
  shared copy or each holding its own (benchmarks/training_features.py, as for VQA);
* GPU epoch: not measured (no GPU on the machine of these figures).

    python benchmarks/captioner.py [--steps 1] [--cider-images 5000] [--threads N]
                                   [--no-models] [--no-features] [--pss-images 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import training_features

from ray_updown.captioning.data import CaptionBatch
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.captioning.objectives import CiderReward, SCSTConfig, scst_loss, xe_loss
from ray_updown.data.text import SPECIALS, Vocab

CONFIGS = {
    "paper": dict(embed_dim=1000, hidden_dim=512, att_dim=1000, vocab_words=10006),
    "small": dict(embed_dim=256, hidden_dim=256, att_dim=256, vocab_words=1996),
}
REGIONS, FEATURE_DIM, MAX_LEN, REFS = 36, 2048, 16, 5


def random_batch(vocab: Vocab, images: int, rng: np.random.Generator) -> CaptionBatch:
    """`images` images with REFS captions of MAX_LEN random words each."""
    captions = [rng.integers(len(SPECIALS), len(vocab), MAX_LEN).tolist()
                for _ in range(images * REFS)]
    targets = torch.zeros(len(captions), MAX_LEN + 1, dtype=torch.long)
    for n, ids in enumerate(captions):
        targets[n, :len(ids) + 1] = torch.tensor(ids + [vocab.eos_id])
    inputs = torch.cat([torch.full((len(captions), 1), vocab.bos_id), targets[:, :-1]], 1)
    refs = [[" ".join(vocab.itos[i] for i in captions[b * REFS + j]) for j in range(REFS)]
            for b in range(images)]
    return CaptionBatch(list(range(images)), torch.randn(images, REGIONS, FEATURE_DIM).relu(),
                        torch.ones(images, REGIONS, dtype=torch.bool),
                        torch.arange(images).repeat_interleave(REFS), inputs, targets, refs)


def timed_steps(step_fn, steps: int) -> float:
    """Seconds per step: the mean of `steps` calls after a warm-up call, or the warm-up call
    alone when it took over 2 s (first-call overheads are then negligible)."""
    start = time.perf_counter()
    step_fn()
    first = time.perf_counter() - start
    if first > 2.0 and steps <= 1:
        return first
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def bench_config(name: str, dims: dict, xe_images: int, scst_images: int, steps: int) -> dict:
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(dims["vocab_words"])])
    config = CaptionerConfig(vocab_size=len(vocab), feat_dim=FEATURE_DIM, max_len=MAX_LEN,
                             embed_dim=dims["embed_dim"], hidden_dim=dims["hidden_dim"],
                             att_dim=dims["att_dim"])
    torch.manual_seed(0)
    model = UpDownCaptioner(config)
    with torch.no_grad():  # candidates of max_len words (see the module docstring)
        model.output_proj.bias[vocab.eos_id] = -30.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    xe_batch = random_batch(vocab, xe_images, rng)
    scst_batch = random_batch(vocab, scst_images, rng)
    reward = CiderReward([random_batch(vocab, 1, rng).references[0] for _ in range(200)], vocab)

    def step(loss_fn):
        loss, _ = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    xe_seconds = timed_steps(lambda: step(lambda: xe_loss(model, xe_batch)), steps)
    model.eval()  # SCST runs without dropout
    out = {"embed_dim": config.embed_dim, "hidden_dim": config.hidden_dim,
           "att_dim": config.att_dim, "vocab_size": config.vocab_size, "regions": REGIONS,
           "feature_dim": FEATURE_DIM, "max_len": MAX_LEN,
           "parameters": sum(p.numel() for p in model.parameters()),
           "xe_images_per_step": xe_images, "xe_captions_per_step": xe_batch.num_captions,
           "xe_seconds_per_step": round(xe_seconds, 3),
           "xe_captions_per_second": round(xe_batch.num_captions / xe_seconds, 1),
           "scst_images_per_step": scst_images}
    generator = torch.Generator().manual_seed(0)
    for form, baseline in (("beam", "greedy"), ("sample", "greedy")):
        scst = SCSTConfig(form=form, baseline=baseline)
        seconds = timed_steps(lambda: step(lambda: scst_loss(model, scst_batch, reward, scst,
                                                             generator)), steps)
        key = f"scst_{form}" if form == "beam" else f"scst_sample_{baseline}"
        out[f"{key}_seconds_per_step"] = round(seconds, 3)
        out[f"{key}_captions_per_second"] = round(scst_images * scst.num_candidates / seconds, 1)
    # the reward's share: score the step's 5 candidates per image
    cands = torch.randint(len(SPECIALS), len(vocab), (scst_images * 5, MAX_LEN))
    refs = [scst_batch.references[n // 5] for n in range(scst_images * 5)]
    out["scst_reward_seconds_per_step"] = round(timed_steps(lambda: reward(cands, refs), 3), 4)
    # the same scores through strings, as the reward ran before it took token ids
    out["scst_reward_strings_seconds_per_step"] = round(
        timed_steps(lambda: reward.score_strings(cands, refs), 3), 4)
    print(f"# {name}: done", file=sys.stderr, flush=True)
    return out


def sibling(name: str):
    """Another benchmark script of this folder, imported as a module."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_cider(images: int) -> dict:
    """Our CIDEr-D vs pycocoevalcap's (benchmarks/cider.py's synthetic captions)."""
    module = sibling("cider")
    from pycocoevalcap.cider.cider import Cider

    from ray_updown.metrics.cider import CiderD, cider_d

    candidates, references = module.synthetic_captions(images, REFS)
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    start = time.perf_counter()
    ref_mean, ref_scores = Cider().compute_score(gts, res)
    t_ref = time.perf_counter() - start
    t_ours = min(timed_steps(lambda: cider_d(candidates, references), 1) for _ in range(2))
    scorer = CiderD(references)
    t_fixed = min(timed_steps(lambda: scorer.score(candidates, references), 1) for _ in range(2))
    ours_mean, ours_scores = cider_d(candidates, references)
    return {"candidates": images, "references_per_candidate": REFS,
            "pycocoevalcap_seconds": round(t_ref, 3), "ours_corpus_seconds": round(t_ours, 4),
            "ours_fixed_df_seconds": round(t_fixed, 4),
            "speedup_corpus": round(t_ref / t_ours, 1),
            "speedup_fixed_df": round(t_ref / t_fixed, 1),
            "max_abs_diff": float(np.max(np.abs(np.asarray(ref_scores) - ours_scores))),
            "means": [float(ref_mean), float(ours_mean)]}


# -- where the features live: loader throughput and PSS of concurrent trials --------------

def write_karpathy(path: str, images: int, seed: int = 0) -> str:
    """A Karpathy file of `images` training images (ids 0..N-1) with REFS random captions."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(50)]
    rows = [{"cocoid": i, "filename": f"{i}.jpg", "split": "train",
             "sentences": [{"tokens": list(t), "raw": " ".join(t)}
                           for t in (rng.choice(words, 10) for _ in range(REFS))]}
            for i in range(images)]
    with open(path, "w") as f:
        json.dump({"dataset": "coco", "images": rows}, f)
    return path


def caption_data(karpathy: str, store: str, cache: str, access: str, workers: int):
    from ray_updown.captioning.data import CaptionData, CaptionDataConfig

    return CaptionData.load(CaptionDataConfig(
        karpathy=karpathy, features=store, vocab_min_count=1, max_regions=REGIONS, val_images=0,
        train_splits=["train"], feature_access=access, feature_cache_dir=cache,
        loader_workers=workers), check_features=False)


def loader_throughput(karpathy: str, store: str, cache: str, workers: list[int], batch: int,
                      max_images: dict[str, int]) -> list[dict]:
    """Shuffled images/s of the captioner's training loader, timed from its first batch."""
    from ray_updown.captioning.data import make_loader

    out = []
    for access, name in (("store", "store_reader"), ("shared", "shared_copy")):
        for w in workers:
            data = caption_data(karpathy, store, cache, access, w)
            regions = data.open_regions()
            order = np.resize(np.random.default_rng(0).permutation(len(data.train_ids)),
                              max_images[name])
            batches = [order[i:i + batch].tolist() for i in range(0, len(order), batch)]
            loader = make_loader(data, regions, data.train_ids, batches)
            out.append({"source": name, **training_features.timed_loader(
                loader, w, lambda b: len(b.image_ids))})
    return out


def pss_child(path: str, batch: int, mode: str) -> None:
    """One captioner 'trial': gather every image once and take two XE steps (small model)."""
    def work():
        regions = training_features.trial_regions(path, mode, REGIONS)
        dims = CONFIGS["small"]
        vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(dims["vocab_words"])])
        model = UpDownCaptioner(CaptionerConfig(
            vocab_size=len(vocab), feat_dim=FEATURE_DIM, max_len=MAX_LEN,
            embed_dim=dims["embed_dim"], hidden_dim=dims["hidden_dim"], att_dim=dims["att_dim"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rows, rng = np.arange(regions.shared.num_images), np.random.default_rng(0)
        for n, start in enumerate(range(0, len(rows), batch)):
            feats, mask = regions.gather(rows[start:start + batch])
            if n < 2:
                captions = random_batch(vocab, len(feats), rng)
                loss, _ = xe_loss(model, dataclasses.replace(captions, feats=feats, mask=mask))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return regions, model

    training_features.serve_until_stdin(work)


def features_benchmarks(args) -> dict:
    root = tempfile.mkdtemp(prefix="captioner-features-", dir=args.work_dir)
    try:
        store = training_features.write_synthetic_store(os.path.join(root, "store"), args.loader_images)
        karpathy = write_karpathy(os.path.join(root, "dataset_coco.json"), args.loader_images)
        workers = sorted({0, 2, *args.loader_workers})
        return {
            "loader": {"images_in_store": args.loader_images, "batch": args.loader_batch,
                       "rows": loader_throughput(karpathy, store, os.path.join(root, "cache"),
                                                 workers, args.loader_batch,
                                                 {"store_reader": args.reader_images,
                                                  "shared_copy": args.shared_images})},
            "pss": training_features.pss_benchmark(root, args.pss_images,
                                                   script=os.path.abspath(__file__),
                                                   batch=args.batch, trials=tuple(args.pss_trials)),
            "gpu_epoch_s": "not measured (no GPU on this machine)"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per measurement")
    parser.add_argument("--cider-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's "
                        "default); on a busy shared machine 1 thread is often faster")
    parser.add_argument("--no-models", action="store_true", help="skip the step rates and CIDEr-D")
    parser.add_argument("--no-features", action="store_true", help="skip loader and PSS figures")
    parser.add_argument("--loader-images", type=int, default=2000, help="images of the loader store")
    parser.add_argument("--loader-batch", type=int, default=20)
    parser.add_argument("--loader-workers", type=int, nargs="*", default=[4],
                        help="loader processes measured besides 0 and 2")
    parser.add_argument("--reader-images", type=int, default=600)
    parser.add_argument("--shared-images", type=int, default=4000)
    parser.add_argument("--pss-images", type=int, default=2000, help="images of the PSS copy")
    parser.add_argument("--pss-trials", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--batch", type=int, default=20, help="images a PSS trial gathers at once")
    parser.add_argument("--work-dir", default=None, help="where the synthetic stores go")
    parser.add_argument("--pss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pss-mode", default="shared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pss_child:
        return pss_child(args.pss_child, args.batch, args.pss_mode)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "processor": platform.processor() or
                          platform.machine(), "device": "cpu"}}
    if not args.no_models:
        # the paper's steps hold 100 captions (20 images x 5); 50 here keep it short
        report["paper"] = bench_config("paper", CONFIGS["paper"], xe_images=10, scst_images=10,
                                       steps=args.steps)
        report["small"] = bench_config("small", CONFIGS["small"], xe_images=20, scst_images=20,
                                       steps=args.steps)
        report["cider_d"] = bench_cider(args.cider_images)
    if not args.no_features:
        report["features"] = features_benchmarks(args)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
