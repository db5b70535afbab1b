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
recipe's tokens. Runs go to --out (default out/recipes/<recipe>-s<seed>); a finished run is read again, not rerun, so
the command resumes after an interruption. Everything after `--` goes to every train.py run (a shape, an LR, ...).
The default shape is d256, 4 layers, 4 heads, block 256, batch 8, 300 steps (614,400 tokens), fp32 on the CPU.
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py
SHAPE = ["--family=deepone", "--n_layer=4", "--n_head=4", "--d_model=256", "--block_size=256", "--batch_size=8",
         "--train_tokens=614400", "--warmup_tokens=40960", "--eval_interval=25", "--eval_iters=8",
         "--log_interval=25", "--save_interval=100000", "--compile=False", "--dtype=float32"]
ADAMW_LR = 2e-3 / math.sqrt(8)  # AdamW 2e-3 at a batch of 8 sequences (train.py's lr is per sequence)
ADAMW = ["--beta1=0.9", "--weight_decay=0.1"]  # the AdamW recipe as it was, pinned against train.py's defaults
MUON_LR = 0.02 / math.sqrt(8)  # Muon 0.02 at a batch of 8, Jordan's and nanochat's
# Under Muon, AdamW trains only the embedding, the head and the gains: nanochat's settings for them (beta1 0.8, no
# weight decay) at 3 x AdamW's LR measured best (dev/LOG.md "Recipe": -0.017 bpb over two seeds against 0.9, 0.1, 1 x).
ADAMW_UNDER_MUON_LR = 3 * ADAMW_LR
ADAMW_UNDER_MUON = ["--beta1=0.8", "--weight_decay=0.0", f"--lr={ADAMW_UNDER_MUON_LR}", f"--muon_lr={MUON_LR}"]
RECIPES = {
    "adamw-cosine": ["--optimizer=adamw", "--lr_schedule=cosine", *ADAMW, f"--lr={ADAMW_LR}", f"--min_lr={ADAMW_LR / 10}"],
    "adamw-wsd": ["--optimizer=adamw", "--lr_schedule=wsd", *ADAMW, f"--lr={ADAMW_LR}", f"--min_lr={ADAMW_LR / 20}"],
    "muon-cosine": ["--optimizer=muon", "--lr_schedule=cosine", *ADAMW_UNDER_MUON,
                    f"--min_lr={ADAMW_UNDER_MUON_LR / 10}"],
    "muon-wsd": ["--optimizer=muon", "--lr_schedule=wsd", *ADAMW_UNDER_MUON, f"--min_lr={ADAMW_UNDER_MUON_LR / 20}"],
}


def val_curve(out_dir):
    """[(tokens, mean val loss, mean val bpb)] of a run's validation records."""
    curve = []
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for record in map(json.loads, f):
            losses = [v for k, v in record.items() if k.startswith("val_loss/")]
            bpbs = [v for k, v in record.items() if k.startswith("val_bpb/")]
            if losses and bpbs:
                curve.append((record["tokens"], sum(losses) / len(losses), sum(bpbs) / len(bpbs)))
    return curve


def tokens_to_reach(curve, target):
    """Tokens at which the bpb curve first falls to target, linear between evaluations; None if it never does."""
    for (t0, _, b0), (t1, _, b1) in zip([(0, None, math.inf)] + curve, curve):
        if b1 <= target:
            return t1 if not math.isfinite(b0) else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def run(recipe, seed, out, data_dir, extra):
    """Train (or resume, or just read) one recipe; returns its validation curve."""
    out_dir = os.path.join(out, f"{recipe}-s{seed}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--device=cpu", f"--data_dir={data_dir}",
           f"--out_dir={out_dir}", f"--seed={seed}", *SHAPE, *RECIPES[recipe], *extra]
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
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated; the first is the reference")
    p.add_argument("--seeds", default="1337,1338", help="comma-separated seeds (model init and batch order)")
    p.add_argument("--out", default="out/recipes", help="where the runs go")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds}: comma-separated integers, e.g. 1337,1338")
    curves = {(r, s): run(r, s, args.out, args.data_dir, extra) for s in seeds for r in recipes}
    print("| recipe | val loss (nats) | val bpb | spread of bpb over seeds | tokens to the first recipe's final bpb |")
    print("|---|---|---|---|---|")
    for r in recipes:
        finals = [curves[r, s][-1] for s in seeds]
        reach = []
        for s in seeds:
            target = curves[recipes[0], s][-1][2]
            t = tokens_to_reach(curves[r, s], target)
            reach.append(t / curves[r, s][-1][0] if t is not None else None)
        reach_text = ("not reached" if None in reach else
                      f"{sum(reach) / len(reach):.2f} x ({', '.join(f'{x:.2f}' for x in reach)})")
        bpbs = [f[2] for f in finals]
        print(f"| {r} | {sum(f[1] for f in finals) / len(finals):.3f} | {sum(bpbs) / len(bpbs):.3f} | "
              f"{max(bpbs) - min(bpbs):.3f} | {reach_text} |")


if __name__ == "__main__":
    main(sys.argv[1:])
