"""How long a training command takes to exit after its last epoch, printed as JSON.

Runs the real CLI (`ray-updown train-vqa`, `train-captioner` XE then SCST, `ensemble`) on toy
data in the real file formats, each in its own process that starts its own local Ray, and
time-stamps every line it prints. For each command:

- last_epoch_to_summary_s: from the last per-epoch progress line to the summary the command
  prints at its end;
- summary_to_exit_s: from that summary to the process's exit (Ray's shutdown, interpreter
  teardown);
- last_epoch_to_exit_s: the two together, the time a user waits for a finished run.

    python benchmarks/exit_time.py [--epochs 2] [--only train-vqa ensemble]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
EPOCH_LINE = re.compile(r": epoch \d+:|\bepoch\b")  # progress lines; Tune's result tables


def timed_run(command: list[str], env: dict) -> dict:
    """Run `command`, stamping each output line; the times around the last epoch line."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, bufsize=1)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    process.wait()
    exited = time.perf_counter() - started
    reader.join()
    # The summary: the JSON document each command prints last (its first line is "{").
    starts = [n for n, (_, line) in enumerate(lines) if line == "{"]
    end = starts[-1] if starts else len(lines)
    epochs = [t for t, line in lines[:end] if EPOCH_LINE.search(line)]
    summary = [lines[end][0]] if starts else []
    out = {"command": command[3], "rc": process.returncode,
           "run_s": round(exited, 1)}
    if process.returncode:
        out["output_tail"] = [line for _, line in lines[-15:]]
        return out
    last_epoch = epochs[-1] if epochs else None
    last_summary = summary[-1] if summary else None
    if last_epoch is not None:
        out["last_epoch_to_exit_s"] = round(exited - last_epoch, 1)
        if last_summary is not None and last_summary >= last_epoch:
            out["last_epoch_to_summary_s"] = round(last_summary - last_epoch, 1)
            out["summary_to_exit_s"] = round(exited - last_summary, 1)
    return out


def commands(root: str, epochs: int) -> dict[str, list]:
    """The toy data and each case's commands (a case may need a first command to start from)."""
    import captioner
    import training_features
    import vqa

    cli = [sys.executable, "-m", "ray_updown.cli"]
    paths = vqa.write_toy_vqa(os.path.join(root, "vqa"), train_images=120, val_images=40)
    vqa_args = [f"data.{k}={v}" for k, v in paths.items()] + [
        "data.answer_min_count=1", "data.max_boxes=10", "model.hidden=64", "model.embed_dim=16",
        "model.question_len=6", "optimizer=adamax", "lr=0.03", f"epochs={epochs}", "batch_size=32",
        "patience=0"]
    karpathy = captioner.write_karpathy(os.path.join(root, "karpathy.json"), 64)
    store = training_features.write_synthetic_store(os.path.join(root, "captions"), 64, k=8, dim=32)
    cap_args = [f"data.karpathy={karpathy}", f"data.features={store}", "data.vocab_min_count=1",
                "data.train_splits=[train]", "data.val_images=8", "model.embed_dim=32",
                "model.hidden_dim=32", "model.att_dim=32", f"epochs={epochs}", "batch_size=16"]
    runs = os.path.join(root, "runs")
    xe = cli + ["train-captioner", "--storage-path", runs, "--name", "xe"] + cap_args
    return {
        "train-vqa": [cli + ["train-vqa", "--storage-path", runs, "--name", "vqa"] + vqa_args],
        "train-captioner-xe": [xe],
        "train-captioner-scst": [xe, lambda: cli + [
            "train-captioner", "--storage-path", runs, "--name", "scst", "objective=scst",
            f"scst.init_from={sorted(glob.glob(f'{runs}/xe/checkpoint_*/'))[-1]}"] + cap_args],
        "ensemble": [cli + ["ensemble", "--members", "2", f"storage_path={runs}", "name=ensemble"]
                     + vqa_args],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="cases to run")
    args = parser.parse_args(argv)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    report = {"benchmark": "exit_time", "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "cases": {}}
    with tempfile.TemporaryDirectory(prefix="exit-time-") as root:
        for case, steps in commands(root, args.epochs).items():
            if args.only and case not in args.only:
                continue
            for command in steps[:-1]:  # what the case starts from
                subprocess.run(command, env=env, capture_output=True, check=True)
            last = steps[-1]() if callable(steps[-1]) else steps[-1]  # may name what came before
            report["cases"][case] = timed_run(last, env)
            print(f"exit_time: {case}: {report['cases'][case]}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
