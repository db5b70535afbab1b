"""
Draw the loss curves of one or more runs from their log.jsonl files, to compare them at a glance.

    python -m tools.plot out/smoke                           # writes curves.png
    python -m tools.plot out/a out/b --out=compare.png       # one colour per run
    python -m tools.plot out/a --smooth=0.95                 # heavier smoothing of the training loss
    python -m tools.plot out/a out/b --val=bpb               # validation in bits per byte (comparable across tokenizers)
    python -m tools.plot out/a --tasks=acc_norm              # the task panel: each task's acc_norm instead of core

Left panel: training loss against tokens seen, smoothed (an exponential moving average, bias-corrected as in Adam,
arXiv 1412.6980 Sec. 3, so the first points are not pulled towards 0), over the raw loss drawn faintly. Right
panel: each subset's validation loss (or, with --val=bpb, bits per byte) against tokens, one line style per subset.
When a run scored eval_tasks (train.py), a third panel draws its core score against tokens (with --tasks=acc or
acc_norm: each task's accuracy, one line style per task). Each argument is a run's out_dir (or its log.jsonl). Needs matplotlib (pip install matplotlib), imported only here.
"""

import argparse
import json
import os
import sys

WIDTH_IN, HEIGHT_IN, DPI = 12, 4.5, 100  # the PNG is WIDTH_IN * DPI x HEIGHT_IN * DPI pixels
STYLES = ("-", "--", ":", "-.")


def read_log(path):
    """(train records, validation records, task records) of one run; a line cut short by a crash is skipped."""
    log = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        sys.exit(f"plot.py: no log at {log}; pass a run's out_dir (where train.py writes log.jsonl)")
    train, val, tasks = [], [], []
    with open(log) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                train.append(record)
            elif any(k.startswith(("val_loss/", "val_bpb/")) for k in record):
                val.append(record)
            elif "eval_tasks_s" in record:
                tasks.append(record)
    return train, val, tasks


def smooth(values, weight):
    """Bias-corrected exponential moving average: the running mean after the first point is that point itself."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def val_tokens(val, train):
    """Tokens seen at each validation record: logged since train.py records them, else read off the training
    records by step (linear interpolation, for logs written before)."""
    if all("tokens" in r for r in val):
        return [r["tokens"] for r in val]
    import numpy as np
    steps, tokens = [r["step"] for r in train], [r["tokens"] for r in train]
    return list(np.interp([r["step"] for r in val], steps, tokens)) if steps else [r["step"] for r in val]


def plot(runs, out, smooth_weight=0.8, val_metric="loss", task_metric="core"):
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib (or pip install -r requirements-extras.txt)")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    logs = [read_log(run) for run in runs]
    with_tasks = any(tasks for _, _, tasks in logs)
    fig, axes = plt.subplots(1, 3 if with_tasks else 2, figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    ax_train, ax_val = axes[:2]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    subsets, task_names = [], []
    for i, (run, (train, val, tasks)) in enumerate(zip(runs, logs)):
        name, colour = os.path.basename(os.path.normpath(run)), colours[i % len(colours)]
        if train:
            x, loss = [r["tokens"] for r in train], [r["loss"] for r in train]
            ax_train.plot(x, loss, color=colour, alpha=0.25, linewidth=0.8)
            ax_train.plot(x, smooth(loss, smooth_weight), color=colour, label=name)
        for key in sorted({k for r in val for k in r if k.startswith(f"val_{val_metric}/")}):
            subset = key.split("/", 1)[1]
            if subset not in subsets:
                subsets.append(subset)
            points = [(t, r[key]) for t, r in zip(val_tokens(val, train), val) if key in r]
            ax_val.plot(*zip(*points), color=colour, linestyle=STYLES[subsets.index(subset) % len(STYLES)],
                        marker="o", markersize=3, label=f"{name} {subset}")
        keys = ["core"] if task_metric == "core" else sorted(
            {k for r in tasks for k in r if k.startswith(f"task_{task_metric}/")})
        for key in keys:
            if key not in task_names:
                task_names.append(key)
            points = [(r["tokens"], r[key]) for r in tasks if key in r]
            if points:
                axes[2].plot(*zip(*points), color=colour, linestyle=STYLES[task_names.index(key) % len(STYLES)],
                             marker="o", markersize=3, label=f"{name} {key.split('/')[-1]}")
        if not train and not val:
            print(f"plot.py: {run} has no loss records yet", file=sys.stderr)
    ax_train.set_title(f"training loss (EMA {smooth_weight})")
    ax_val.set_title("validation loss" if val_metric == "loss" else "validation bits per byte")
    if with_tasks:
        axes[2].set_title("core (centered accuracy, 0 = chance)" if task_metric == "core" else f"task {task_metric}")
        axes[2].set_ylabel(task_metric)
    ax_train.set_ylabel("cross-entropy (nats/token)")
    ax_val.set_ylabel("cross-entropy (nats/token)" if val_metric == "loss" else "bits per byte")
    for ax in axes:
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)  # no bbox_inches='tight': the image keeps its stated size
    plt.close(fig)
    return out


def main(argv):
    parser = argparse.ArgumentParser(description="Plot training and validation loss of smoltrain runs.")
    parser.add_argument("runs", nargs="+", help="out_dir of each run (or a log.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    parser.add_argument("--smooth", type=float, default=0.8, help="EMA weight for the training loss, in [0, 1)")
    parser.add_argument("--val", choices=("loss", "bpb"), default="loss",
                        help="right panel: validation loss (nats/token) or bits per byte")
    parser.add_argument("--tasks", choices=("core", "acc", "acc_norm"), default="core",
                        help="task panel (runs with eval_tasks): the core score, or each task's acc or acc_norm")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth={args.smooth} must be in [0, 1): 0 = no smoothing, 0.99 = heavy")
    print(f"wrote {plot(args.runs, args.out, args.smooth, args.val, args.tasks)}")


if __name__ == "__main__":
    main(sys.argv[1:])
