"""
Compare training recipes at equal tokens: train.py runs of one shape on prepared data, same seed and so the same
initial weights and batches, one run per recipe and seed; prints validation loss and bits per byte side by side.

    python -m tools.bench_recipe --data_dir=data/standin                              # the four recipes, seeds 1337 and 1338
    python -m tools.bench_recipe --data_dir=data/standin --recipes=adamw-cosine,muon-wsd --seeds=1337 -- --n_layer=8 --d_model=512

Recipes (the names say optimizer and schedule, so the two effects can be told apart):
    adamw-cosine   AdamW, warmup then cosine to 0.1 x lr          (smoltrain's recipe before Muon)
    adamw-wsd      AdamW, warmup-stable-decay, linear to 0.05 x lr over the last decay_frac
    muon-cosine    Muon on the Blocks' matrices + AdamW on the rest (beta1 0.8, no weight decay, 3 x lr), cosine
    muon-wsd       Muon + AdamW as muon-cosine, warmup-stable-decay (nanochat's recipe; train.py's default)

For each recipe: final mean validation loss and bpb over the subsets (mean over seeds, and the spread max - min), and
the tokens it took to first reach the first recipe's final bpb (linear between evaluations), as a share of that
recipe's tokens. With --target_bpb, time to a target loss: the training seconds (the steps' wall clock, compilation
included, evaluations and checkpoints not), steps and tokens at which the mean validation bpb first reaches the
target, linear between evaluations (train.py logs train_s with each evaluation), per recipe and seed. Runs go to --out
(default out/recipes/<recipe>-s<seed>); a finished run is read again, not rerun, so the command resumes after an
interruption. Everything after `--` goes to every train.py run (a shape, an LR, ...). The default shape (--shape=small)
is d256, 4 layers, 4 heads, block 256, batch 8, 300 steps (614,400 tokens), fp32 on the CPU; --shape=deepone is
config/deepone.py as it is (bf16, compile), for a GPU: give it --device=cuda and a --train_tokens after `--`.

    python -m tools.bench_recipe --data_dir=data/standin --recipes=muon-wsd,adamw-cosine --target_bpb=2.3
    python -m tools.bench_recipe --data_dir=data/sample --shape=deepone --device=cuda --recipes=default,adamw-wsd \
        --target_bpb=1.2 --seeds=1337 -- --train_tokens=500000000
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py
SHAPES = {"small": ["--family=deepone", "--n_layer=4", "--n_head=4", "--d_model=256", "--block_size=256", "--batch_size=8",
         "--train_tokens=614400", "--warmup_tokens=40960", "--eval_interval=25", "--eval_iters=8",
         "--log_interval=25", "--save_interval=100000", "--compile=False", "--dtype=float32"],
          "deepone": ["config/deepone.py", "--eval_interval=50", "--log_interval=10", "--save_interval=100000"]}
ADAMW_LR = 2e-3 / math.sqrt(8)  # AdamW 2e-3 at a batch of 8 sequences (train.py's lr is per sequence)
ADAMW = ["--beta1=0.9", "--weight_decay=0.1"]  # the AdamW recipe as it was, pinned against train.py's defaults
MUON_LR = 0.02 / math.sqrt(8)  # Muon 0.02 at a batch of 8, Jordan's and nanochat's
# Under Muon, AdamW trains only the embedding, the head and the gains: nanochat's settings for them (beta1 0.8, no
# weight decay) at 3 x AdamW's LR measured best (dev/LOG.md "Recipe": -0.017 bpb over two seeds against 0.9, 0.1, 1 x).
ADAMW_UNDER_MUON_LR = 3 * ADAMW_LR
ADAMW_UNDER_MUON = ["--beta1=0.8", "--weight_decay=0.0", f"--lr={ADAMW_UNDER_MUON_LR}", f"--muon_lr={MUON_LR}"]
RECIPES = {
    "default": [],  # train.py's own settings (muon-wsd at the default LRs)
    "adamw-cosine": ["--optimizer=adamw", "--lr_schedule=cosine", *ADAMW, f"--lr={ADAMW_LR}", f"--min_lr={ADAMW_LR / 10}"],
    "adamw-wsd": ["--optimizer=adamw", "--lr_schedule=wsd", *ADAMW, f"--lr={ADAMW_LR}", f"--min_lr={ADAMW_LR / 20}"],
    "muon-cosine": ["--optimizer=muon", "--lr_schedule=cosine", *ADAMW_UNDER_MUON,
                    f"--min_lr={ADAMW_UNDER_MUON_LR / 10}"],
    "muon-wsd": ["--optimizer=muon", "--lr_schedule=wsd", *ADAMW_UNDER_MUON, f"--min_lr={ADAMW_UNDER_MUON_LR / 20}"],
}


def val_curve(out_dir):
    """[{"step", "tokens", "train_s", "loss", "bpb"}] of a run's validation records (means over the subsets)."""
    curve = []
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for record in map(json.loads, f):
            losses = [v for k, v in record.items() if k.startswith("val_loss/")]
            bpbs = [v for k, v in record.items() if k.startswith("val_bpb/")]
            if losses and bpbs:
                curve.append({"step": record["step"], "tokens": record["tokens"], "train_s": record.get("train_s"),
                              "loss": sum(losses) / len(losses), "bpb": sum(bpbs) / len(bpbs)})
    return curve


def first_reach(curve, target):
    """{"step", "tokens", "train_s"} where the bpb curve first falls to target, each linear between the evaluation
    before (or the start: step 0, no tokens, no time) and the first one at or below target; None if it never does."""
    before = {"step": 0, "tokens": 0, "train_s": 0.0, "bpb": math.inf}
    for point in curve:
        if point["bpb"] <= target:
            share = 1.0 if not math.isfinite(before["bpb"]) else (before["bpb"] - target) / (before["bpb"] - point["bpb"])
            return {k: (None if point[k] is None or before[k] is None else before[k] + share * (point[k] - before[k]))
                    for k in ("step", "tokens", "train_s")}
        before = point
    return None


def run(recipe, seed, args, extra):
    """Train (or resume, or just read) one recipe; returns its validation curve."""
    out_dir = os.path.join(args.out, f"{recipe}-s{seed}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SHAPES[args.shape], f"--device={args.device}",
           f"--data_dir={args.data_dir}", f"--out_dir={out_dir}", f"--seed={seed}", *RECIPES[recipe], *extra]
    print(f"[recipe] {recipe} seed {seed}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_recipe.py: {recipe} seed {seed} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return val_curve(out_dir)


def main(argv):
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    else:
        extra = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="prepared data (prepare.py --out)")
    p.add_argument("--recipes", default="adamw-cosine,adamw-wsd,muon-cosine,muon-wsd",
                   help=f"comma-separated, from {', '.join(RECIPES)}; the first is the reference")
    p.add_argument("--seeds", default="1337,1338", help="comma-separated seeds (model init and batch order)")
    p.add_argument("--out", default="out/recipes", help="where the runs go")
    p.add_argument("--shape", default="small", choices=list(SHAPES), help="small: the CPU recipe shape; deepone: "
                   "config/deepone.py as it is")
    p.add_argument("--device", default="cpu", help="train.py's --device (cuda for --shape=deepone)")
    p.add_argument("--target_bpb", type=float, default=None, help="also report the time, steps and tokens each recipe "
                   "took to first reach this mean validation bpb")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds}: comma-separated integers, e.g. 1337,1338")
    if args.target_bpb is not None and not args.target_bpb > 0:
        p.error(f"--target_bpb={args.target_bpb}: a mean validation bits per byte above 0, e.g. 2.3")
    curves = {(r, s): run(r, s, args, extra) for s in seeds for r in recipes}
    print(final_table(curves, recipes, seeds))
    if args.target_bpb is not None:
        print()
        print(target_table(curves, recipes, seeds, args.target_bpb))


def mean_and_each(values, fmt, missing="not reached"):
    """'mean (each, each)' of per-seed values, or 'not reached by k of n seeds' when k have None."""
    missed = [v for v in values if v is None]
    if missed:
        return f"{missing} by {len(missed)} of {len(values)} seeds"
    each = f" ({', '.join(fmt.format(v) for v in values)})" if len(values) > 1 else ""
    return fmt.format(sum(values) / len(values)) + each


def final_table(curves, recipes, seeds):
    """Final val loss and bpb per recipe (means over seeds), and tokens to the first recipe's final bpb."""
    lines = ["| recipe | val loss (nats) | val bpb | spread of bpb over seeds | tokens to the first recipe's final bpb |",
             "|---|---|---|---|---|"]
    for r in recipes:
        finals = [curves[r, s][-1] for s in seeds]
        reach = [first_reach(curves[r, s], curves[recipes[0], s][-1]["bpb"]) for s in seeds]
        shares = [x["tokens"] / curves[r, s][-1]["tokens"] if x else None for x, s in zip(reach, seeds)]
        bpbs = [f["bpb"] for f in finals]
        lines.append(f"| {r} | {sum(f['loss'] for f in finals) / len(finals):.3f} | {sum(bpbs) / len(bpbs):.3f} | "
                     f"{max(bpbs) - min(bpbs):.3f} | {mean_and_each(shares, '{:.2f} x')} |")
    return "\n".join(lines)


def target_table(curves, recipes, seeds, target):
    """Time to target: training seconds, steps and tokens at which each recipe first reached the target bpb."""
    lines = [f"time to a mean validation bpb of {target:g} (means over seeds {', '.join(map(str, seeds))}; each seed "
             "in brackets)", "", "| recipe | training seconds | steps | tokens |", "|---|---|---|---|"]
    for r in recipes:
        reach = [first_reach(curves[r, s], target) for s in seeds]
        unlogged = any(x and x["train_s"] is None for x in reach)  # a log of a train.py without train_s
        lines.append(f"| {r} | " + " | ".join(
            mean_and_each([x[key] if x else None for x in reach], fmt,
                          "not logged" if key == "train_s" and unlogged else "not reached")
            for key, fmt in (("train_s", "{:,.1f}"), ("step", "{:,.1f}"), ("tokens", "{:,.0f}"))) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
