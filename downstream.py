"""
Downstream benchmarks on the live model: lm-evaluation-harness tasks scored by smoltrain's own model during training
(no export, no second copy of the weights), and a CORE-style summary figure. Used by train.py (eval_tasks).

    python train.py config/smoke.py --eval_tasks=hellaswag,arc_easy,piqa --eval_tasks_limit=200
    python train.py ... --eval_tasks=my_task --eval_tasks_path=my_tasks/     # a local YAML task, no hub needed

    tasks = load_tasks("hellaswag,arc_easy", include_path="")    # at start: TaskError names what is wrong
    lm = ModelLM(model, enc, block_size, rows=8, device="cuda:0", autocast=ctx)
    record = score(lm, tasks, limit=200)    # {"task_acc/hellaswag": ..., "task_acc_norm/...": ..., "core": ...}
    print(summary(record, tasks))           # hellaswag acc_norm 0.2950 (centered 0.0600) | ... | core 0.0412 | ...

ModelLM is an lm-eval model (TemplateLM) whose log-likelihoods come from smoltrain's Transformer: each request's
tokens as lm-eval's HFLM with add_bos_token=True forms them (<|endoftext|> first, as every training document
starts; the context's trailing space moved to the continuation; the last block_size + 1 tokens kept), so the
numbers equal `lm_eval --model hf` on the exported checkpoint. The requests are packed as documents into rows of
block_size tokens (document-causal attention, as in training: no padding to the longest request), batches of the
training batch's shape (no recompile of compiled layers), run under the run's autocast; only the continuation's
hidden states go through the head. With several ranks (DDP or FSDP) each rank scores every world_size-th request
and the results are all-gathered, so the cost per rank falls with their number; every rank runs the same number of
forwards (FSDP gathers weights in each). Tasks scored by log-likelihood only: multiple_choice, loglikelihood,
loglikelihood_rolling; generative tasks are refused (export the model and run lm_eval --model hf).

core: the mean over the named tasks (a group: the mean of its tasks) of the centered accuracy
(acc - chance) / (1 - chance) (DCLM, arXiv 2406.11794 Sec. 3.5; nanochat's CORE), chance = the mean over the scored
examples of 1 / their number of choices, 0 for tasks without choices; acc is lm-eval's acc_norm where the task
reports it (length-normalized, as SmolLM's tables), else acc. 0 = chance, 1 = every answer right.
"""
import dataclasses
import difflib
import json
import math
import os
import time

import torch
import torch.distributed as dist

import checkpoint

INSTALL = "pip install 'lm-eval>=0.4.13' (or pip install -r requirements-extras.txt)"
try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # train.py imports this file only when eval_tasks is set, and reports this message
    raise ImportError(f"eval_tasks needs lm-evaluation-harness, which is not installed ({e}): {INSTALL}") from None

SCORED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")


class TaskError(Exception):
    """A task list that cannot be scored; the message names the task and what to do."""


def load_tasks(names, include_path=""):
    """lm-eval's task dict for comma-separated `names` (tasks or groups), data loaded now, so that an unknown name,
    a missing lm-eval or data neither cached nor downloadable is a TaskError at start, not at the first evaluation."""
    from lm_eval.tasks import TaskManager
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    manager = None
    if include_path:  # indexing lm-eval's own ~15k task files takes seconds: skip it when the local ones suffice
        local = TaskManager(include_path=include_path, include_defaults=False)
        manager = local if all(n in local.all_tasks for n in wanted) else None
    manager = manager or TaskManager(include_path=include_path or None)
    if not hasattr(manager, "load"):
        raise TaskError("eval_tasks needs lm-evaluation-harness 0.4.13 or newer (TaskManager.load): "
                        "pip install -U 'lm-eval>=0.4.13'")
    unknown = [n for n in wanted if n not in manager.all_tasks]
    if unknown:
        hints = [f"{n} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(n, manager.all_tasks,
                 3)) else n for n in unknown]
        raise TaskError(f"eval_tasks: unknown task {', '.join(hints)}; `lm_eval ls tasks` lists lm-eval's tasks"
                        + (f", and eval_tasks_path={include_path!r} adds its YAML files" if include_path else
                           "; a local task's YAML goes in a directory named by --eval_tasks_path"))
    with preserved_rng():  # building a task may draw from the global RNGs (few-shot samplers)
        try:
            loaded, leaves = {"tasks": {}, "groups": {}, "group_map": {}}, {}
            for name in wanted:  # one at a time, to know which tasks each name (a task, group or tag) stands for
                one = manager.load([name])
                leaves[name] = list(one["tasks"])
                for key, value in loaded.items():
                    value.update(one.get(key) or {})
        except Exception as e:  # datasets raises many types: ConnectionError, FileNotFoundError, DatasetNotFoundError
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise TaskError(
                f"eval_tasks: the data of {', '.join(wanted)} could not be loaded ({type(e).__name__}: {reason}). "
                f"lm-eval reads each task's dataset from the Hugging Face datasets cache or the hub: on a machine "
                f"without network, load the tasks once where the hub is reachable (e.g. lm_eval --model dummy "
                f"--tasks {','.join(wanted)} --limit 1) with the same HF_HOME, then run with HF_DATASETS_OFFLINE=1") \
                from None
    odd = {name: task.OUTPUT_TYPE for name, task in loaded["tasks"].items() if task.OUTPUT_TYPE not in SCORED_TYPES}
    if odd:
        raise TaskError(f"eval_tasks: {', '.join(f'{n} ({t})' for n, t in odd.items())}: only tasks scored by "
                        f"log-likelihood run during training ({', '.join(SCORED_TYPES)}); score generative tasks "
                        f"after training: python -m tools.export, then lm_eval --model hf")
    return Tasks(leaves, loaded)


@dataclasses.dataclass
class Tasks:
    """What load_tasks loaded: {each name asked for (a task, group or tag): the tasks it stands for}, and lm-eval's
    {"tasks", "groups", "group_map"} of them all, as lm_eval.evaluator.evaluate takes it."""
    leaves: dict
    lm_eval: dict


class preserved_rng:
    """Leave torch's, CUDA's, Python's and numpy's global RNG states as they were: an evaluation must not change the
    random stream of training."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.state = checkpoint.rng_state(cuda=self.cuda)

    def __exit__(self, *exc):
        checkpoint.set_rng_state(self.state, cuda=self.cuda)


class ModelLM(TemplateLM):
    """smoltrain's Transformer as an lm-eval model: log-likelihoods only (see the module docstring).
    model: the Transformer (its FSDP-sharded self under FSDP; never the DDP wrapper); enc: the tiktoken encoding;
    rows: sequences per forward; sharded: FSDP (the root's embedding and head are gathered for the evaluation);
    log: a print function for progress (rank 0's print, or None)."""

    def __init__(self, model, enc, block_size, rows, device, autocast, sharded=False, log=None):
        super().__init__()  # lm-eval's LM: rank 0 of 1, so lm-eval itself does not split; score_tokens splits
        self.model, self.enc, self.block_size, self.rows = model, enc, block_size, rows
        self.device_name, self.autocast, self.sharded, self.log = device, autocast, sharded, log
        self.requests_scored, self.tokens_scored = 0, 0  # since the last score(): for the log and cost measurements
        self.ranks = dist.get_world_size() if dist.is_initialized() else 1
        self.my_rank = dist.get_rank() if dist.is_initialized() else 0

    @property
    def eot_token_id(self):
        return self.enc.eot_token

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """tiktoken's BPE, the literal '<|endoftext|>' as its token (as the exported tokenizer.json does), after
        <|endoftext|> unless add_special_tokens=False (lm-eval's HFLM with add_bos_token=True)."""
        ids = self.enc.encode(string, allowed_special={"<|endoftext|>"})
        return ids if add_special_tokens is False else [self.enc.eot_token] + ids

    def loglikelihood(self, requests, disable_tqdm=False):
        return super().loglikelihood(requests, disable_tqdm=True)  # score_tokens prints its own progress

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        # HFLM's window: the last block_size + 1 tokens of context + continuation, the input all but the last
        return self.score_tokens([((ctx + cont)[-(self.block_size + 1):], len(cont)) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            # as HFLM with add_bos_token=True: the text's tokens start with <|endoftext|>, which the window's own
            # <|endoftext|> prefix then predicts (one token more than the text's, in both)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.block_size, 1)):
                windows.append(((ctx + cont)[-(self.block_size + 1):], len(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError("generative tasks do not run during training (load_tasks refuses them)")

    @torch.no_grad()
    def score_tokens(self, sequences):
        """[(sum of the log-probabilities of the last n tokens of seq, whether each of them is the greedy choice)]
        for [(seq, n)]; seq at most block_size + 1 tokens, n >= 1. Every rank passes the same sequences."""
        self.requests_scored += len(sequences)
        self.tokens_scored += sum(len(seq) - 1 for seq, _ in sequences)  # the inputs, over all ranks
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # longest first: rows fill well
        mine = order[self.my_rank::self.ranks]
        # Rows of a power of two >= 4 x the longest request and >= 128 (flex_attention's block), at most block_size:
        # 4 requests or more fill a row to about 80% or more, and the rows stay short, as the dense masks of eager and
        # sdpa cost rows x length^2 (requests in block_size rows would pay for attention they never use). Batches of
        # at most the training batch's tokens, all of one shape (one compile, the same at every evaluation), as even
        # as can be: a padded last batch would cost a whole forward.
        longest = max((len(seq) - 1 for seq, _ in sequences), default=1)
        length = min(self.block_size, max(128, 1 << (4 * longest - 1).bit_length()))
        packed = self._pack(sequences, mine, length)
        n_rows = torch.tensor([len(packed)], device=self.device_name)
        if self.ranks > 1:  # every rank the same number of forwards: FSDP gathers weights in each
            dist.all_reduce(n_rows, op=dist.ReduceOp.MAX)
        n_rows = int(n_rows)
        n_batches = -(-n_rows // max(1, self.rows * self.block_size // length))
        per_batch = -(-n_rows // max(1, n_batches))
        batches = [packed[i:i + per_batch] for i in range(0, len(packed), per_batch)]
        sums = torch.zeros(len(mine), dtype=torch.float64, device=self.device_name)
        misses = torch.zeros(len(mine), dtype=torch.float64, device=self.device_name)  # non-greedy tokens
        empty = ([0] * length, [0] * length, [], [], [])
        start, shown = time.time(), 0
        last = start
        model = self.model
        was_training = model.training
        model.eval()
        if self.sharded:
            model.unshard()  # hidden() and the head are called directly, not through the root forward
        try:
            for b in range(n_batches):
                rows = batches[b] if b < len(batches) else []
                rows = rows + [empty] * (per_batch - len(rows))
                self._forward(rows, length, sums, misses)
                done = math.floor(10 * (b + 1) / n_batches)  # in tenths; shown at most every 10 s, and at the end
                if self.log and ((done > shown and time.time() - last >= 10) or b + 1 == n_batches):
                    shown, last = done, time.time()
                    self.log(f"eval_tasks | {b + 1}/{n_batches} batches of {per_batch} x {length} "
                             f"({len(sequences):,} requests over {self.ranks} rank(s)) | {time.time() - start:.1f} s")
        finally:
            if self.sharded:
                model.reshard()
            model.train(was_training)
        parts = [torch.stack([sums, misses], 1)]  # this rank's, in the order of `mine`
        if self.ranks > 1:
            padded = torch.zeros(-(-len(sequences) // self.ranks), 2, dtype=torch.float64, device=self.device_name)
            padded[:len(mine)] = parts[0]
            parts = [torch.empty_like(padded) for _ in range(self.ranks)]
            dist.all_gather(parts, padded)
        results = [None] * len(sequences)
        for r, part in enumerate(parts):  # rank r scored order[r::ranks]; zip drops the padding rows
            for i, (logprob, miss) in zip(order[r::self.ranks], part.tolist()):
                results[i] = (logprob, miss == 0)
        return results

    @staticmethod
    def _pack(sequences, mine, T):
        """Rows of T tokens, each a run of whole requests (next fit, in the given order): per row (tokens, document
        ids, target positions, target tokens, request slots)."""
        rows, row = [], None
        for slot, i in enumerate(mine):
            seq, n = sequences[i]
            inputs, targets = seq[:-1], seq[1:]
            if row is None or len(row[0]) + len(inputs) > T:
                row = ([], [], [], [], [])
                rows.append(row)
            offset, doc = len(row[0]), (row[1][-1] + 1) if row[1] else 0
            row[0].extend(inputs)
            row[1].extend([doc] * len(inputs))
            first = len(inputs) - n
            row[2].extend(range(offset + first, offset + len(inputs)))
            row[3].extend(targets[first:])
            row[4].extend([slot] * n)
        for tokens, docs, *_ in rows:  # the rest of a row: one padding document, never a target
            pad = T - len(tokens)
            tokens.extend([0] * pad)
            docs.extend([(docs[-1] + 1) if docs else 0] * pad)
        return rows

    def _forward(self, rows, T, sums, misses):
        """One forward of a batch of packed rows of T tokens; adds each target's log-probability and whether it
        missed the greedy choice to its request's slot."""
        dev = self.device_name
        x = torch.tensor([r[0] for r in rows], dtype=torch.long).to(dev, non_blocking=True)
        doc_ids = torch.tensor([r[1] for r in rows], dtype=torch.long).to(dev, non_blocking=True)
        positions = torch.tensor([j * T + p for j, r in enumerate(rows) for p in r[2]], dtype=torch.long).to(dev)
        targets = torch.tensor([t for r in rows for t in r[3]], dtype=torch.long).to(dev)
        slots = torch.tensor([s for r in rows for s in r[4]], dtype=torch.long).to(dev)
        model = self.model
        with self.autocast:
            h = model.hidden(x, doc_ids).flatten(0, 1)
            # the head over the continuation tokens only, in chunks: never [tokens, vocab] logits for a whole batch
            for chunk in torch.arange(len(positions), device=dev).split(model.config.loss_chunk_size):
                logits = model.logits(h[positions[chunk]])
                logprobs = logits.log_softmax(-1).gather(1, targets[chunk, None]).squeeze(1)
                sums.index_add_(0, slots[chunk], logprobs.double())
                misses.index_add_(0, slots[chunk], (logits.argmax(-1) != targets[chunk]).double())


def score(lm, tasks, limit=0):
    """Score load_tasks' Tasks with lm, at most `limit` examples a task (0 = all); returns the log record's fields:
    per task (a group's or tag's each) task_acc/<task> and task_acc_norm/<task> (where it reports them; perplexity
    tasks task_word_perplexity/<task> and task_bits_per_byte/<task>), per name asked for task_centered/<name> (the
    mean over its tasks), "core" (their mean), the examples scored, the requests (one per choice) and input tokens
    they took, and the wall time in seconds (eval_tasks_s)."""
    from lm_eval.evaluator import evaluate
    start, lm.requests_scored, lm.tokens_scored = time.time(), 0, 0
    with preserved_rng():
        results = evaluate(lm, tasks.lm_eval, limit=limit or None, log_samples=True, bootstrap_iters=0,
                           verbosity="ERROR")
    metrics = results["results"]
    record, centered, examples = {}, {}, 0
    for task, samples in results["samples"].items():
        examples += len(samples)
        for metric in ("acc", "acc_norm", "word_perplexity", "bits_per_byte"):
            if f"{metric},none" in metrics[task]:
                record[f"task_{metric}/{task}"] = metrics[task][f"{metric},none"]
        acc = metrics[task].get("acc_norm,none", metrics[task].get("acc,none"))
        if acc is None:  # a perplexity task (loglikelihood_rolling): no accuracy, not in core
            continue
        multiple_choice = tasks.lm_eval["tasks"][task].OUTPUT_TYPE == "multiple_choice"
        chance = sum(1 / len(s["filtered_resps"]) for s in samples) / len(samples) if multiple_choice else 0.0
        centered[task] = (acc - chance) / (1 - chance)
    named = {}
    for name, leaves in tasks.leaves.items():
        if leaves and all(t in centered for t in leaves):  # a group or tag: the mean of its tasks
            named[name] = record[f"task_centered/{name}"] = sum(centered[t] for t in leaves) / len(leaves)
    if named:
        record["core"] = sum(named.values()) / len(named)
    record["eval_tasks_examples"] = examples
    record["eval_tasks_requests"], record["eval_tasks_tokens"] = lm.requests_scored, lm.tokens_scored
    record["eval_tasks_s"] = time.time() - start
    return record


def write_task(folder, name, data_file, output_type, text, target, choice=None, split="validation",
               metrics=("acc", "acc_norm"), tag=None):
    """Write folder/<name>.yaml, a local lm-eval task over a JSON-lines file of documents (text, target and choice
    are lm-eval's jinja templates over a document's fields), and return its path; --eval_tasks_path=folder finds it.
    For cost measurements and the tests: a task that needs no hub."""
    lines = [f"task: {name}", *([f"tag: [{tag}]"] if tag else []), "dataset_path: json", "dataset_kwargs:",
             "  data_files:", f"    {split}: {data_file}", f"{split}_split: {split}", f"output_type: {output_type}",
             f"doc_to_text: {json.dumps(text)}", f"doc_to_target: {json.dumps(target)}",
             *([f"doc_to_choice: {json.dumps(choice)}"] if choice else []), "metric_list:"]
    for metric in metrics:  # accuracies: the mean, higher is better (lm-eval's defaults for them, written out)
        lines += [f"  - metric: {metric}"] + (["    aggregation: mean", "    higher_is_better: true"]
                                              if metric in ("acc", "acc_norm") else [])
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def summary(record, tasks):
    """One line for train.py's output: per name its accuracy (acc_norm, else acc; a group's tasks' mean) or word
    perplexity, the centered accuracy, core, and what the evaluation cost."""
    parts = []
    for name, leaves in tasks.leaves.items():
        for metric in ("acc_norm", "acc", "word_perplexity"):
            values = [record[f"task_{metric}/{t}"] for t in leaves if f"task_{metric}/{t}" in record]
            if values:
                parts.append(f"{name} {metric} {sum(values) / len(values):.4f}"
                             + (f" (centered {record[f'task_centered/{name}']:.4f})"
                                if f"task_centered/{name}" in record else ""))
                break
    if "core" in record:
        parts.append(f"core {record['core']:.4f}")
    n, seconds = record["eval_tasks_examples"], record["eval_tasks_s"]
    return " | ".join(parts + [f"{n:,} examples in {seconds:.1f} s ({1e3 * seconds / max(1, n):.0f} ms each)"])
