"""
The GPU check: the measurements that decide smoltrain's GPU defaults, in one command, written to one report.

    python -m tools.gpu_check --data_dir=data/sample              # on a CUDA machine: the plan, within 8 minutes
    python -m tools.gpu_check --data_dir=data/sample --nanogpt=../nanoGPT/model.py   # nanoGPT's own model beside
    python -m tools.gpu_check --data_dir=data/sample --dry_run    # anywhere: resolve every step, run none of them
    python -m tools.gpu_check --only=tests,backends --out=gpu_check   # named steps (--only=all: plan and extras)

Each step is one command of this repo (pytest, tools/bench.py, train.py), run as a subprocess with its own time limit
inside the whole check's --budget_s; a step that fails or runs out of time is reported with the tail of its output
and the check goes on. The report, OUT/gpu_check.md and OUT/gpu_check.json, holds every command, its exit status,
wall time and the records bench.py printed (--json=True), rewritten after each step so that a killed check keeps
what it measured. --dry_run runs each step's own resolution instead (bench.py and train.py --dry_run=True, pytest
--collect-only), so a typo in a config, a key or a path shows on a CPU before a GPU is lent. --data_dir is the only
input: prepared data for the train.py step (python prepare.py --docs 2000 --out data/sample makes it); checkpoints
go under --work (default /tmp/gpu_check), never into OUT.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: the commands run there
PY = sys.executable
BENCH = [PY, "-m", "tools.bench", "--json=True"]
# GPT-2 small, nanoGPT's benchmark shape: 12 x d768, one causal sequence of 1024 per row, tied head; the GLU's
# d_ff 2048 x 3 matrices hold the parameters of nanoGPT's 3072 x 2
GPT2_SMALL = ["config/llama_52m.py", "--n_layer=12", "--d_model=768", "--n_head=12", "--n_kv_head=12", "--d_ff=2048",
              "--tie_embeddings=True", "--block_size=1024", "--batch_size=16", "--doc_len=0"]
DEEPONE_834M = ["config/deepone.py", "--n_layer=24", "--d_model=1536", "--n_head=12", "--n_kv_head=12", "--d_ff=4096",
                "--batch_size=4"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# The plan's time: a bench process spends 35-80 s compiling on an H200 (torch 2.11), then seconds measuring
# (deepone's step ~0.1 s, the 1.7B's 0.43 s); pytest -m cuda took 108 s with warm compile caches. Each limit is
# about 1.5 x the expected time; the whole plan is expected near 7 minutes of its 8.
PLAN = ("default model", "gpt2-small accum 8", "nanoGPT accum 8", "profile", "1.7B in 24 GiB", "train 5 steps",
        "resume to 10", "tests")


def steps(data_dir, work, nanogpt=""):
    """[(name, argv, time limit in s, text its output must hold or None)]: the plan (PLAN, in its order: the most
    telling figures first, the CUDA tests last, each of them given what is left of the budget) and then the extra
    steps that --only names (backends, compile modes, memory). The nanoGPT step is there when nanogpt names its
    model.py."""
    train = [PY, "train.py", "config/deepone.py", f"--data_dir={data_dir}", f"--out_dir={work}/train",
             "--train_tokens=10000000", "--save_interval=5", "--log_interval=1", "--eval_interval=0",
             "--compile=False"]  # save and resume are checked here, not speed: no compilation
    quick = ["--warmup=1", "--steps=3"]
    plan = [
        # the default recipe (Muon) and torch's fused AdamW on one compiled model: the optimizer's cost
        ("default model", [*BENCH, "config/deepone.py", "--optimizer=muon,adamw"], 150, None),
        # nanoGPT's benchmark shape at its tokens per optimizer step (its GPT-2 run steps every ~0.5M tokens: 8 x 16
        # x 1024 here is 131k), then nanoGPT's own model.py at the same shape, timed by the same loop
        ("gpt2-small accum 8", [*BENCH, *GPT2_SMALL, "--attn_impl=sdpa", "--grad_accum=8", "--optimizer=muon,adamw",
                                *quick], 120, None),
        *([("nanoGPT accum 8", [*BENCH, *GPT2_SMALL, "--grad_accum=8", "--what=reference", f"--reference={nanogpt}",
                                *quick], 100, None)] if nanogpt else []),
        ("profile", [*BENCH, "config/deepone.py", "--what=profile", "--warmup=1", "--steps=2"], 100, None),
        ("1.7B in 24 GiB", [*BENCH, "config/deepone_1b7.py", "--memory_limit_gb=24", *quick], 150, None),
        ("train 5 steps", [*train, "--max_steps=5"], 60, "step 5/"),
        ("resume to 10", [*train, "--max_steps=10"], 60, "resuming from"),
        ("tests", [PY, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests"], 240, None),
    ]
    extra = [
        ("backends", [*BENCH, "config/deepone.py", "--attn_impl=all"], 240, None),
        ("gpt2-small flex", [*BENCH, *GPT2_SMALL, "--attn_impl=flex_attention"], 90, None),
        *[(f"default model compile {mode}", [*BENCH, "config/deepone.py", f"--compile_mode={mode}"], 150, None)
          for mode in COMPILE_MODES[1:]],
        *[(f"834M compile {mode}", [*BENCH, *DEEPONE_834M, f"--compile_mode={mode}"], 240, None)
          for mode in COMPILE_MODES],
        ("memory", [*BENCH, "config/deepone.py", "--what=memory"], 120, None),
    ]
    return plan + extra


def shown(argv):
    """argv as a user types it: python for this interpreter's path."""
    return " ".join(["python", *argv[1:]] if argv[0] == PY else argv)


def dry(argv):
    """The command that resolves argv without running it."""
    if "pytest" in argv:
        return [*argv, "--collect-only"]
    return [*argv, "--dry_run=True"]


def run_step(name, argv, limit, expect):
    start = time.time()
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    records = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {"step": name, "command": shown(argv), "rc": rc,
            "ok": rc == 0 and not any("error" in r for r in records) and (expect is None or expect in out), "wall_s": round(time.time() - start, 1),
            "records": records, "tail": out[-3000:] if rc != 0 or not records else out[-600:]}


def write_report(out, results, header):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "steps": results}, indent=1) + "\n")
    lines = [f"# GPU check\n\n{header}\n", "| step | ok | wall s | command |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {'yes' if r['ok'] else 'NO (' + str(r['rc']) + ')'} | {r['wall_s']} | "
              f"`{r['command']}` |" for r in results]
    for r in results:
        lines.append(f"\n## {r['step']}\n\n`{r['command']}`: exit {r['rc']}, {r['wall_s']} s\n")
        if r["records"]:
            keys = list(dict.fromkeys(k for rec in r["records"] for k in rec))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(rec.get(k, "")) for k in keys) + " |" for rec in r["records"]]
        if not r["ok"] or not r["records"]:
            lines += ["", "```", r["tail"].rstrip(), "```"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--data_dir", default="data/sample", help="prepared data for the train.py steps")
    p.add_argument("--out", default="gpu_check", help="where the report goes")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch space: the train.py steps' checkpoints")
    p.add_argument("--budget_s", type=float, default=480, help="the whole check's time; a step gets what is left")
    p.add_argument("--only", default="", help="comma-separated step names or prefixes, or 'all' for the plan and "
                   "every extra step (default: the plan: " + ", ".join(PLAN) + ")")
    p.add_argument("--nanogpt", default="", help="nanoGPT's model.py (git clone https://github.com/karpathy/nanoGPT;"
                   " never committed here): adds its run at the GPT-2-small shape beside smoltrain's")
    p.add_argument("--dry_run", action="store_true", help="resolve every step (configs, keys, paths), run none")
    args = p.parse_args(argv)
    if args.nanogpt and not Path(args.nanogpt).is_file():
        p.error(f"--nanogpt={args.nanogpt}: no such file; give the path of nanoGPT's model.py")
    plan = steps(args.data_dir, args.work, args.nanogpt)
    if not args.only:
        plan = [s for s in plan if s[0] in PLAN]
    elif args.only != "all":
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(step[0].startswith(w) for step in plan)]
        if unknown:
            p.error(f"--only: no step named {', '.join(unknown)}; the steps: {', '.join(s[0] for s in plan)}")
        plan = [s for s in plan if any(s[0].startswith(w) for w in wanted)]
    if not (Path(args.data_dir) / "meta.json").exists() and any(s[0].startswith(("train", "resume")) for s in plan):
        p.error(f"--data_dir {args.data_dir}: no prepared data (meta.json); make it with: "
                f"python prepare.py --docs 2000 --out {args.data_dir}")
    import torch  # only here: --help and argument errors come at once
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    if not torch.cuda.is_available() and not args.dry_run:
        p.error("this machine has no CUDA GPU; --dry_run resolves the steps here without running them")
    header = (f"{gpu} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M:%S')}"
              + (" | dry run: each step resolved, none run" if args.dry_run else "")
              + ("" if args.nanogpt else " | nanoGPT side by side: not run (--nanogpt=PATH to its model.py)"))
    out, deadline, results = Path(args.out), time.time() + args.budget_s, []
    for name, argv, limit, expect in plan:
        left = deadline - time.time()
        if left < 10:
            results.append({"step": name, "command": shown(argv), "rc": "not run", "ok": False, "wall_s": 0,
                            "records": [], "tail": f"the check's budget ({args.budget_s:g} s) was spent"})
        else:
            print(f"[gpu_check] {name}: {shown(argv)}", file=sys.stderr, flush=True)
            results.append(run_step(name, dry(argv) if args.dry_run else argv, min(limit, left),
                                    None if args.dry_run else expect))
            print(f"[gpu_check] {name}: {'ok' if results[-1]['ok'] else 'FAILED (' + str(results[-1]['rc']) + ')'}"
                  f" in {results[-1]['wall_s']} s", file=sys.stderr, flush=True)
        write_report(out, results, header)
    failed = [r["step"] for r in results if not r["ok"]]
    print(f"[gpu_check] {len(results) - len(failed)}/{len(results)} steps ok"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report: {out}/gpu_check.md", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
