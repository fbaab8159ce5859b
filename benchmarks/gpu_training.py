"""The training half of benchmarks/gpu_check.py: every GPU figure of VQA and captioner training.

Sections (each a function of gpu_check's; `dry` = CPU, tiny sizes, for the test suite):

- vqa_steps:   `train_step` samples/s at batch 512 of the three VQA presets (paper,
               reimplementation, projection) in fp32 and bf16, at the paper's input sizes
               (benchmarks/vqa.py `training_speed`); and the paper's preset with
               `packed_questions=false` (no host sync a step), which stays off until this
               judges it;
- vqa_profile: where a step's time goes, per preset and precision (torch.profiler): wall and
               device-busy time a step, kernels launched, the costliest operations;
- vqa_epoch:   an epoch of a tenth of COCO (44,376 questions over 8,278 images x 36 x 2,048
               fp16, features on the device), paper preset, fp32 and bf16, the bare loop of
               benchmarks/vqa.py (`vqa_epoch`);
- vqa_loop:    the same data as files in VQA v2's layout, trained by `run_vqa_loop` in this
               process and by `train_vqa` (Ray Train, one GPU worker) where Ray is importable:
               the second epoch's samples/s of each;
- ensemble:    4 trial processes sharing the GPU at once, each with its own features on the
               device (as 4 Tune trials of 0.25 GPU), in fp32 and then in bf16: their summed
               samples/s and each one's peak GPU memory. From these, *computed* (labelled so): how many COCO-sized
               trials fit on this GPU and the wall clock of a 30-member x 30-epoch ensemble
               on 1 and on 8 such GPUs;
- captioner:   XE (100 images x 5 captions) and SCST (beam 5, 100 images) steps of the
               paper-sized captioner through `captioning.train.train_step`, fp32 and bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COCO_QUESTIONS, COCO_IMAGES = 443_757, 82_783  # VQA v2 train; COCO train2014 images
ENSEMBLE = {"members": 30, "epochs": 30}       # the paper's ensemble, 30 epochs each
TRIALS_SHARING = 4


def _device(device: str):
    import torch

    return torch.device(device)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def vqa_steps(dry: bool, device: str) -> dict:
    """Samples/s of one `train_step` per preset and precision."""
    import vqa

    batch, steps = (8, 1) if dry else (512, 20)
    out = {}
    for preset in ("paper", "reimplementation", "projection"):
        for precision in ("fp32", "bf16"):
            figures = vqa.training_speed(preset, batch, steps, _device(device), precision)
            out[f"{preset}_{precision}"] = figures["samples_per_s"]
        out[f"{preset}_parameters"] = figures["parameters"]
        out[f"{preset}_bf16_over_fp32"] = round(out[f"{preset}_bf16"] / out[f"{preset}_fp32"], 2)
    for precision in ("fp32", "bf16"):  # the GRU on the padded batch: no host sync a step
        figures = vqa.training_speed("paper", batch, steps, _device(device), precision,
                                     packed_questions=False)
        out[f"paper_unpacked_{precision}"] = figures["samples_per_s"]
        out[f"paper_unpacked_over_packed_{precision}"] = round(
            figures["samples_per_s"] / out[f"paper_{precision}"], 2)
    return {"batch": batch, "steps": steps, "samples_per_s": out}


def vqa_profile(dry: bool, device: str) -> dict:
    """Where a `train_step` goes, per preset and precision (torch.profiler): the step's wall
    time, the device's busy time in it (a step that waits on the host shows busy < wall),
    the kernels launched and the costliest operations, each with its time a step (on the
    device; on the CPU where no kernel ran)."""
    import vqa
    from torch.profiler import ProfilerActivity, profile

    from ray_updown.vqa.train import train_step

    dev, batch_size, steps = _device(device), (8 if dry else 512), (1 if dry else 10)
    batch = vqa._batch(batch_size, dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out = {"batch": batch_size, "steps": steps}
    for preset in ("paper", "reimplementation", "projection"):
        for precision in ("fp32", "bf16"):
            model, optimizer = vqa.preset_model(dev, preset)
            for _ in range(2):  # warm-up
                train_step(model, optimizer, batch, 0.25, precision)
            _sync(device)
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                for _ in range(steps):
                    train_step(model, optimizer, batch, 0.25, precision)
                _sync(device)
                wall = (time.perf_counter() - started) / steps
            out[f"{preset}_{precision}"] = _profile_summary(prof, wall, steps)
    return out


def _profile_summary(prof, wall: float, steps: int) -> dict:
    import torch

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3

    def self_us(event) -> float:  # on the device where kernels ran, else on the CPU
        return event.self_device_time_total if kernels else event.self_cpu_time_total

    costliest = sorted(prof.key_averages(), key=self_us, reverse=True)[:8]
    return {"wall_ms": round(wall * 1e3, 2), "device_busy_ms": round(busy, 2),
            "kernels": round(len(kernels) / steps), "costliest_on": "cuda" if kernels else "cpu",
            "costliest_ms": {e.key[:80]: round(self_us(e) / steps / 1e3, 3) for e in costliest}}


def _tenth(dry: bool) -> tuple[int, int, int]:
    """(questions, images, batch) of the epoch: a tenth of COCO at batch 512, or a toy's."""
    return (96, 24, 32) if dry else (COCO_QUESTIONS // 10, COCO_IMAGES // 10 + 1, 512)


def _store(root: str, dry: bool) -> tuple[str, str]:
    """A synthetic store of the epoch's images (36 x 2048 float16) and its shared-copy folder."""
    import training_features

    from ray_updown.features.shared import shared_features

    store, cache = os.path.join(root, "train-store"), os.path.join(root, "train-cache")
    if not os.path.isdir(store):
        training_features.write_synthetic_store(store, _tenth(dry)[1])
        shared_features(store, cache)  # built once here, mapped by every trial after
    return store, cache


def vqa_epoch_figures(root: str, dry: bool, device: str) -> dict:
    import vqa

    store, cache = _store(root, dry)
    questions, images, batch = _tenth(dry)
    out = {}
    for precision in ("fp32", "bf16"):
        vqa.vqa_epoch(store, cache, questions, images, batch, _device(device), precision=precision)
        out[precision] = vqa.vqa_epoch(store, cache, questions, images, batch, _device(device),
                                       precision=precision)  # the second: warm
    out["bf16_over_fp32"] = round(out["bf16"]["samples_per_s"] / out["fp32"]["samples_per_s"], 2)
    return out


def write_vqa_files(root: str, store_images: int, questions: int, seed: int = 0) -> dict:
    """Questions and annotations in VQA v2's layout over the store's image ids 0..N-1: random
    8-word questions over 19,901 words, one of 3,129 answers each (so both vocabularies have
    the paper's sizes when there are enough questions)."""
    from ray_updown import storage

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(19_901)])
    image_ids = rng.integers(0, store_images, questions)
    answers = rng.integers(0, 3129, questions)
    texts = rng.integers(0, len(words), (questions, 8))
    rows = [{"question_id": q, "image_id": int(image_ids[q]),
             "question": " ".join(words[texts[q]]) + "?"} for q in range(questions)]
    notes = [{"question_id": q, "image_id": int(image_ids[q]), "question_type": "what is",
              "answer_type": "other", "multiple_choice_answer": f"a{answers[q]}",
              "answers": [{"answer": f"a{answers[q]}", "answer_confidence": "yes", "answer_id": n}
                          for n in range(1, 11)]} for q in range(questions)]
    paths = {"train_questions": os.path.join(root, "v2_OpenEnded_mscoco_train2014_questions.json"),
             "train_annotations": os.path.join(root, "v2_mscoco_train2014_annotations.json")}
    storage.write_json(paths["train_questions"], {"data_subtype": "train2014", "questions": rows})
    storage.write_json(paths["train_annotations"], {"data_subtype": "train2014", "annotations": notes})
    return paths


def vqa_loop(root: str, dry: bool, device: str) -> dict:
    """The whole training loop on files, bare and through Ray Train: second epoch's samples/s."""
    from ray_updown.train.session import LocalSession
    from ray_updown.vqa.config import VqaTrainConfig
    from ray_updown.vqa.train import check_inputs, run_vqa_loop

    store, cache = _store(root, dry)
    questions, images, batch = _tenth(dry)
    paths = write_vqa_files(root, images, questions)
    cfg = check_inputs(VqaTrainConfig.from_dict({
        "data": {**paths, "features": store, "feature_cache_dir": cache, "answer_min_count": 1,
                 "max_boxes": 36},
        "model": {"hidden": 32, "embed_dim": 16} if dry else {},
        "epochs": 2, "batch_size": batch, "patience": 0, "use_gpu": device == "cuda",
        "storage_path": os.path.join(root, "vqa-runs"), "name": "bare"}))
    session = LocalSession(os.path.join(root, "vqa-runs", "bare"))
    started = time.perf_counter()
    run_vqa_loop(cfg.to_dict(), session)
    out = {"questions": questions, "images": images,
           "bare": {"samples_per_s": round(session.reports[-1][0]["samples_per_s"], 1),
                    "run_s": round(time.perf_counter() - started, 1)}}
    try:
        import ray  # noqa: F401
    except ImportError:
        out["ray_train"] = {"skipped": "Ray is not importable here"}
        return out
    from ray_updown.ray_cluster import ensure_ray
    from ray_updown.vqa.train import train_vqa

    ensure_ray()
    started = time.perf_counter()
    result = train_vqa(VqaTrainConfig.from_dict({**cfg.to_dict(), "name": "ray-train"}))
    rate = result["metrics"]["samples_per_s"]
    out["ray_train"] = {"samples_per_s": round(rate, 1), "run_s": round(time.perf_counter() - started, 1),
                        "over_bare": round(rate / out["bare"]["samples_per_s"], 3)}
    return out


def ensemble(root: str, dry: bool, device: str) -> dict:
    """TRIALS_SHARING trial processes on one device at once, in fp32 and then in bf16, each
    with the computed ensemble of its rate."""
    return {precision: _trials_sharing(root, dry, device, precision) for precision in ("fp32", "bf16")}


def _trials_sharing(root: str, dry: bool, device: str, precision: str) -> dict:
    store, cache = _store(root, dry)
    questions, images, batch = _tenth(dry)
    command = [sys.executable, os.path.abspath(__file__), "--trial", store, cache, str(questions),
               str(images), str(batch), device, precision]
    started = time.perf_counter()
    count = 2 if dry else TRIALS_SHARING  # two CPU processes check the same code
    trials = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE)
              for _ in range(count)]
    results = [json.loads(t.communicate(timeout=600)[0].strip().splitlines()[-1]) for t in trials]
    if any(t.returncode for t in trials):
        raise RuntimeError(f"a trial process failed: {[t.returncode for t in trials]}")
    rate = sum(r["samples_per_s"] for r in results)
    out = {"trials": count, "precision": precision, "questions_each": questions,
           "images_each": images, "wall_s": round(time.perf_counter() - started, 1),
           "summed_samples_per_s": round(rate, 1), "per_trial": results}
    if device == "cuda":
        out["computed_from_these_measurements"] = computed_ensemble(results, rate)
    return out


def computed_ensemble(results: list[dict], rate: float) -> dict:
    """How many COCO-sized trials fit on this GPU, and the paper's ensemble's wall clock on 1
    and 8 GPUs at the measured summed rate: arithmetic on measurements, not a measurement."""
    import torch

    _, total = torch.cuda.mem_get_info()
    full_features = COCO_IMAGES * 36 * 2048 * 2  # float16 on the device
    besides = max(r["peak_gpu_bytes"] - r["features_on_gpu_bytes"] for r in results)
    per_trial = full_features + besides
    samples = ENSEMBLE["members"] * ENSEMBLE["epochs"] * COCO_QUESTIONS
    return {"gpu_bytes": total, "coco_trial_bytes": per_trial,
            "coco_trials_that_fit": int(0.95 * total // per_trial),
            "ensemble": ENSEMBLE, "rate_used_samples_per_s": round(rate, 1),
            "ensemble_wall_min_1_gpu": round(samples / rate / 60, 1),
            "ensemble_wall_min_8_gpus": round(samples / rate / 8 / 60, 1)}


def _trial(store: str, cache: str, questions: int, images: int, batch: int, device: str,
           precision: str) -> None:
    """One trial process: an epoch to warm up, a timed one, its peak GPU memory; JSON out."""
    import torch
    import vqa

    dev = torch.device(device)
    vqa.vqa_epoch(store, cache, questions, images, batch, dev, precision=precision)
    epoch = vqa.vqa_epoch(store, cache, questions, images, batch, dev, precision=precision)
    cuda = device == "cuda"
    print(json.dumps({"samples_per_s": epoch["samples_per_s"], "epoch_s": epoch["epoch_s"],
                      "features_on_gpu_bytes": images * 36 * 2048 * 2 if cuda else 0,
                      "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0}))


def captioner_steps(dry: bool, device: str) -> dict:
    """XE and SCST-beam steps of the paper-sized captioner, fp32 and bf16, on the device."""
    import captioner
    import torch

    from ray_updown.captioning.config import CaptionTrainConfig
    from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
    from ray_updown.captioning.objectives import CiderReward
    from ray_updown.captioning.train import train_step
    from ray_updown.data.text import SPECIALS, Vocab

    dims = captioner.CONFIGS["small" if dry else "paper"]
    images, steps = (4, 1) if dry else (100, 5)
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(dims["vocab_words"])])
    rng = np.random.default_rng(0)
    batch = captioner.random_batch(vocab, images, rng).to(_device(device))
    reward = CiderReward([captioner.random_batch(vocab, 1, rng).references[0] for _ in range(200)],
                         vocab)
    out = {"images_per_step": images, "captions_per_xe_step": images * captioner.REFS}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = UpDownCaptioner(CaptionerConfig(
            vocab_size=len(vocab), feat_dim=captioner.FEATURE_DIM, max_len=captioner.MAX_LEN,
            embed_dim=dims["embed_dim"], hidden_dim=dims["hidden_dim"], att_dim=dims["att_dim"]))
        with torch.no_grad():  # candidates of max_len words, as benchmarks/captioner.py
            model.output_proj.bias[vocab.eos_id] = -30.0
        model.to(_device(device))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator(device=device).manual_seed(0)
        for objective in ("xe", "scst"):
            cfg = CaptionTrainConfig(objective=objective, precision=precision)
            model.train(objective == "xe")
            step = lambda: train_step(model, optimizer, batch, cfg, vocab.pad_id, reward, generator)  # noqa: E731
            step()
            _sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            per_step = (time.perf_counter() - started) / steps
            key = f"{objective}_{precision}"
            out[f"{key}_images_per_s"] = round(images / per_step, 1)
            if objective == "xe":
                out[f"{key}_captions_per_s"] = round(images * captioner.REFS / per_step, 1)
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--trial"]:
    sys.path.insert(0, HERE)
    store_, cache_, questions_, images_, batch_, device_, precision_ = sys.argv[2:9]
    _trial(store_, cache_, int(questions_), int(images_), int(batch_), device_, precision_)
