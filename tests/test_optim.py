"""optim.py's batched step: Muon's stacks against the per-matrix reference, the operators a step dispatches at any
depth, no recompiles as the schedule moves, the orthogonalization shared over 2 gloo ranks (DDP and FSDP2), and
checkpoints of the per-matrix layout. On the CPU; the compiled kernels are compiled for the CPU."""
import copy
import math
import subprocess
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import muon_ranks
import optim
from conftest import ROOT, cuda_only
from model import ModelConfig, Transformer

# same-shape matrices interleaved with others, wide and tall (tall ones are orthogonalized transposed)
SHAPES = [(24, 16), (16, 40), (24, 16), (40, 16), (16, 40), (24, 16)]
LR, STEPS, WARMUP = 0.02, 20, 10


def reference_muon(weights, grads_per_step, ns_dtype):
    """Muon one matrix at a time, written out: EMA momentum, Nesterov, optim.orthogonalize of each matrix, the shape
    factor sqrt(max(1, rows / cols)), the momentum warming up from 0.85 to 0.95 over WARMUP steps."""
    weights = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for step, grads in enumerate(grads_per_step, 1):
        mu = 0.85 + min(1.0, step / WARMUP) * 0.1
        for i, (w, g) in enumerate(zip(weights, grads)):
            bufs[i] = bufs[i].lerp(g, 1 - mu)
            ortho = optim.orthogonalize(g.lerp(bufs[i], mu), dtype=ns_dtype).float()
            weights[i] = w - LR * math.sqrt(max(1, w.size(0) / w.size(1))) * ortho
    return weights


def batched_muon(weights, grads_per_step, ns_dtype, compile=False, lrs=None):
    params = [w.clone().requires_grad_() for w in weights]
    opt = optim.Muon([{"params": params, "muon": True}], lr=LR, momentum_warmup_steps=WARMUP, ns_dtype=ns_dtype,
                     compile=compile)
    for step, grads in enumerate(grads_per_step):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def case(steps=STEPS):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    return weights, [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


def test_batched_muon_equals_the_per_matrix_reference_over_20_steps():
    """Orthogonalizing in fp32, the stacks give the reference's weights to fp32 rounding; in bf16 to within bf16
    rounding of each step's update: a few bf16 ulps (2^-8 relative) of lr x scale x |O| a step, far below one step's
    size (a wrong momentum, scale or matrix order misses by whole steps)."""
    weights, grads = case()
    for ns_dtype in (torch.float32, torch.bfloat16):
        ours, ref = batched_muon(weights, grads, ns_dtype), reference_muon(weights, grads, ns_dtype)
        for a, b, w in zip(ours, ref, weights):
            assert not torch.allclose(a, w, atol=0.1)  # they moved
            if ns_dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
            else:
                step_size = LR * math.sqrt(max(1, w.size(0) / w.size(1)))
                assert (a - b).abs().max() < STEPS * step_size * 2**-6, (a - b).abs().max()


def test_a_step_dispatches_the_same_operators_at_any_depth():
    """The operators one optimizer step dispatches (its direct children in torch.profiler, the GPU's kernel
    launches follow them) do not grow with the number of same-shape matrices: models of 2 and 8 layers give the same
    count, for fp32 and bf16 weights and for bf16 AdamW. The per-matrix loop dispatched 740 and 2,762 (at any width)."""
    def count(n_layer, optimizer, param_dtype):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(family="deepone", vocab_size=256, block_size=32, n_layer=n_layer, n_head=2,
                                        d_model=32, d_ff=64)).to(dtype=getattr(torch, param_dtype))
        opt = optim.make_optimizer(model, optimizer, param_dtype, 1e-3, (0.8, 0.95), 0.0, 0, "cpu", muon_lr=0.02)
        x = torch.randint(0, 256, (2, 32))
        for step in range(2):  # the first step creates the state
            model(x, x)[1].backward()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
            opt.zero_grad()
        step_event = [e for e in prof.events() if e.cpu_parent is None]
        assert len(step_event) == 1 and step_event[0].name.startswith("Optimizer.step")
        return Counter(e.name for e in prof.events() if e.cpu_parent is step_event[0])
    for optimizer, param_dtype in (("muon", "float32"), ("muon", "bfloat16"), ("adamw", "bfloat16")):
        shallow, deep = count(2, optimizer, param_dtype), count(8, optimizer, param_dtype)
        assert shallow == deep, (optimizer, param_dtype, shallow - deep, deep - shallow)
        assert sum(shallow.values()) < (200 if param_dtype == "float32" else 1300), sum(shallow.values())


def test_compiled_kernels_never_recompile_as_lr_and_momentum_move():
    """compile=True: one graph per kernel and stack shape at the first step; the LR changing every step and the
    momentum warming up change device tensors, not graphs. The compiled step gives the eager one's weights."""
    from torch._dynamo.utils import counters
    weights, grads = case(steps=6)
    lrs = [LR * (1 - i / 10) for i in range(6)]
    torch._dynamo.reset()
    counters.clear()
    compiled = batched_muon(weights, grads[:1], torch.float32, compile=True, lrs=lrs)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3 * 3  # (momentum, orthogonalization, update) x the 3 shapes
    compiled = batched_muon(weights, grads, torch.float32, compile=True, lrs=lrs)
    assert counters["stats"]["unique_graphs"] == graphs
    eager = batched_muon(weights, grads, torch.float32, lrs=lrs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ranks_share_the_orthogonalization_and_give_the_one_rank_weights(tmp_path):
    """2 gloo ranks (tests/muon_ranks.py): DDP (each rank orthogonalizes its share of each stack, then all-gather)
    and FSDP2 (all_to_all of row shards to the matrices' owners and back) give one process's weights, with fp32 and
    bf16 weights (stochastic rounding hashes each element's place in the whole matrix, so the bits match too on this
    CPU), with one stack per shape and with several (padded); DDP's replicas hold the same bits."""
    out = tmp_path / "ranks.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "muon_ranks.py"), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out)
    default = optim.STACK_ELEMENTS
    for stack_elements in (default, 16):
        optim.STACK_ELEMENTS = stack_elements
        try:
            for dtype in (torch.float32, torch.bfloat16):
                one = muon_ranks.muon_case(dtype)
                name = f"{str(dtype)[6:]}, stacks of {stack_elements}"
                assert results[f"replicas equal, {name}"], name
                for mode in ("ddp", "fsdp"):
                    for a, b in zip(results[f"{mode}, {name}"], one):
                        # fp32: rounding of the sums; bf16: at most one bf16 step of the largest weight
                        tolerance = 1e-6 if dtype == torch.float32 else 2**-8
                        assert (a.float() - b.float()).abs().max() <= tolerance * b.float().abs().max(), (mode, name)
        finally:
            optim.STACK_ELEMENTS = default


def test_stochastic_rounding_of_a_shard_is_that_of_its_rows_in_the_whole_tensor():
    """The random bits hash each element's place in the whole tensor (first_element: where a shard starts), so an
    FSDP rank rounds its rows as one process rounds them in the whole matrix; another step or parameter draws others."""
    x = torch.randn(2, 7, 5) + 1e-3  # a stack of two parameters, most values between two bf16 neighbours
    keys = optim.mix32(torch.tensor([11, 12]))
    whole = optim.stochastic_round_to_bf16(x, keys)
    for start, stop in ((0, 4), (4, 7)):
        shard = optim.stochastic_round_to_bf16(x[:, start:stop].contiguous(), keys, first_element=start * 5)
        assert torch.equal(shard, whole[:, start:stop])
    assert not torch.equal(optim.stochastic_round_to_bf16(x, keys + 1), whole)


def test_a_checkpoint_of_the_per_matrix_layout_resumes_the_run():
    """The state layout is the per-matrix Muon's: per parameter 'step' and 'momentum_buffer' (Muon) or 'step',
    'exp_avg', 'exp_avg_sq' (AdamW), steps on the CPU and no 'fused' in the groups. Such a state dict, loaded with
    train.py's restore_group_settings, continues the run as if it had never stopped."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="deepone", vocab_size=256, block_size=32, n_layer=2, n_head=2, d_model=32,
                                    d_ff=64))
    x = torch.randint(0, 256, (2, 32))

    def run(model, opt, steps):
        for _ in range(steps):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad()

    def new(model):
        return optim.make_optimizer(model, "muon", "float32", 1e-3, (0.8, 0.95), 0.0, 0, "cpu", muon_lr=0.02)
    stopped = copy.deepcopy(model)
    opt = new(model)
    run(model, opt, 4)
    opt_stopped = new(stopped)
    run(stopped, opt_stopped, 2)
    saved = copy.deepcopy(opt_stopped.state_dict())
    keys = {frozenset(s) for s in saved["state"].values()}
    assert keys == {frozenset({"step", "momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    for group in saved["param_groups"]:  # as the per-matrix Muon wrote it
        group.pop("fused", None)
    for state in saved["state"].values():
        state["step"] = state["step"].cpu()
    resumed = copy.deepcopy(stopped)
    opt_resumed = new(resumed)
    settings = optim.group_settings(opt_resumed)
    opt_resumed.load_state_dict(saved)
    assert optim.restore_group_settings(opt_resumed, settings) == ["fused: checkpoint None, this run True"]
    run(resumed, opt_resumed, 2)
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)


@cuda_only("Muon's compiled kernels on a GPU")
def test_compiled_step_on_a_gpu_matches_the_reference_and_never_syncs():
    """On a GPU (compile=True, orthogonalization in bf16, the defaults there): the stacks give the per-matrix
    reference's weights within bf16 rounding, and once compiled no step synchronizes with the host, with fp32
    weights (torch's fused AdamW beside Muon) and bf16 weights (stochastic rounding), as the LR moves."""
    weights, grads = case()
    on_gpu = lambda tensors: [t.cuda() for t in tensors]  # noqa: E731
    ours = batched_muon(on_gpu(weights), [on_gpu(g) for g in grads], None, compile=True)
    ref = reference_muon(on_gpu(weights), [on_gpu(g) for g in grads], torch.bfloat16)
    for a, b, w in zip(ours, ref, weights):
        assert (a - b).abs().max() < STEPS * LR * math.sqrt(max(1, w.size(0) / w.size(1))) * 2**-6
    for dtype in (torch.float32, torch.bfloat16):
        params = [w.cuda().to(dtype).requires_grad_() for w in weights] + [torch.ones(16, device="cuda", dtype=dtype,
                                                                                      requires_grad=True)]
        opt = optim.Muon([{"params": params[:-1], "muon": True}, {"params": params[-1:]}], lr=LR, compile=True)
        for step, step_grads in enumerate(grads[:4]):
            for p, g in zip(params, step_grads + [torch.randn(16)]):
                p.grad = g.cuda().to(dtype)
            for group in opt.param_groups:
                group["lr"] = LR * (1 - step / 10)
            torch.cuda.set_sync_debug_mode("error" if step else "default")  # step 0 compiles and builds the stacks
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all(p.isfinite().all() for p in params)
