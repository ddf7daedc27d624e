"""The optimiser step of opcd.py: AdamW whose updates survive bf16 weights (--master), and the
FSDP2 / all-reduce helpers that it and sft.py step through (--fsdp, torchrun)."""
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from mgsd import cli


class MasterAdamW:
    """AdamW for a bf16 model that still moves by lr-1e-6 steps (--master):
    fp32        fp32 copies of the weights and states take the step and the result is rounded into the
                model (16 bytes a trainable parameter besides the bf16 weight and gradient);
    stochastic  the step is taken in fp32 on the fly and the new weight rounded to bf16 *stochastically*
                (up with probability = the distance to the lower neighbour / the gap): a 1e-6 step
                moves every weight by 1e-6 in expectation; fp32 moments (8 bytes a parameter: bf16
                moments round away Adam's own small updates, v's above all);
    bf16        the reference: AdamW on the bf16 weights themselves, where a 1e-6 step rounds away.
    An fp32 model (CPU) is its own master in fp32 and bf16 modes."""

    def __init__(self, params, lr, betas, weight_decay, master="fp32"):
        self.params, self.mode = [p for p in params if p.requires_grad], master
        self.lr, self.betas, self.weight_decay, self.t = lr, betas, weight_decay, 0
        if master == "stochastic":
            self.state = [{k: torch.zeros_like(p, dtype=torch.float32) for k in ("m", "v")} for p in self.params]
            self.master = self.params
            return
        self.master = [p if (master == "bf16" or p.dtype == torch.float32) else p.detach().float().clone().requires_grad_()
                       for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay)

    def step(self, max_grad_norm):
        """Clip the gradients' global norm to max_grad_norm (0: no clipping) and take the step; a non-finite norm
        (the same on every rank) raises cli.NonFinite and leaves the weights as they were."""
        for p, m in zip(self.params, self.master):
            if m is not p:  # the bf16 gradient is dropped as soon as its fp32 copy exists
                m.grad, p.grad = None if p.grad is None else p.grad.float(), None
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.master, max_grad_norm or math.inf))  # all shards
        if not torch.isfinite(grad_norm):
            self.zero_grad()
            raise cli.NonFinite(f"gradient norm {grad_norm.item()}: the step was not taken")
        if self.mode == "stochastic":
            self.stochastic_step()
        else:
            self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        self.zero_grad()
        require_finite_weights(self.master)
        return grad_norm.item()

    @torch.no_grad()
    def stochastic_step(self, eps=1e-8, chunk=1 << 24):
        """One AdamW step, `chunk` elements at a time (fp32 temporaries of 64 MB, not of a whole 389M-element
        embedding), each gradient freed once it is consumed."""
        self.t += 1
        (b1, b2), lr = self.betas, self.lr
        noise = torch.Generator(self.params[0].device).manual_seed(self.t)  # same bits on --resume
        for p, s in zip(self.params, self.state):
            if p.grad is None:
                continue
            grads, weights, ms, vs = local(p.grad).reshape(-1), local(p).view(-1), local(s["m"]).view(-1), local(s["v"]).view(-1)
            for i in range(0, weights.numel(), chunk):
                g, m, v = grads[i:i + chunk].float(), ms[i:i + chunk], vs[i:i + chunk]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                w = weights[i:i + chunk].float().mul_(1 - lr * self.weight_decay)
                w.addcdiv_(m / (1 - b1 ** self.t), (v / (1 - b2 ** self.t)).sqrt_().add_(eps), value=-lr)
                if p.dtype == torch.bfloat16:  # add 16 random low bits, then cut them: bf16 is fp32's upper half
                    bits = w.view(torch.int32) + torch.randint(0, 1 << 16, w.shape, device=w.device, dtype=torch.int32,
                                                              generator=noise)
                    w = (bits & -65536).view(torch.float32)
                weights[i:i + chunk].copy_(w)
            p.grad = None

    def zero_grad(self):
        for t in self.params + self.master:
            t.grad = None

    def state_dict(self):
        """Whole tensors, also under --fsdp (a collective then: every rank calls it)."""
        if self.mode == "stochastic":
            return {"t": self.t, "state": [{k: full_tensor(v) for k, v in s.items()} for s in self.state],
                    "master": [full_tensor(p.detach()).clone() for p in self.params]}
        opt = self.opt.state_dict()
        opt["state"] = {i: {k: full_tensor(v) for k, v in s.items()} for i, s in opt["state"].items()}
        return {"opt": opt, "master": [full_tensor(m.detach()).clone() for m in self.master]}

    def load(self, path, device):
        """The trainer state opcd.py saved at `path` (its optimizer part restored here); one line, exit 2 if it
        cannot be read."""
        try:
            saved = torch.load(path, map_location=device, weights_only=False)
            self.load_state_dict(saved["optimizer"])
            return saved
        except Exception as e:  # a truncated or foreign file: torch and pickle raise many types
            cli.fail(f"--resume: cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")

    def load_state_dict(self, state):
        if self.mode == "stochastic":
            self.t = state["t"]
            with torch.no_grad():
                for s, saved in zip(self.state, state["state"]):
                    for k in s:
                        s[k].copy_(like(saved[k], s[k]))
        else:
            opt = state["opt"]
            opt["state"] = {i: {k: like(v, self.master[int(i)]) if v.dim() else v for k, v in s.items()}
                            for i, s in opt["state"].items()}
            self.opt.load_state_dict(opt)
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.master, state["master"]):
                m.copy_(like(saved, m))
                p.copy_(like(saved, p))


def require_finite_weights(params):
    """cli.NonFinite on every rank if any rank's weights (or shards) hold a NaN or an infinity after a step (an lr
    so large that the update overflows): the run stops before it samples from or saves such weights."""
    bad = torch.stack([~torch.isfinite(local(p.detach())).all() for p in params]).any().double() if params else \
        torch.zeros((), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item():
        raise cli.NonFinite("the step made weights NaN or inf (is --lr too large?)")


def full_tensor(t):
    """The whole tensor of an FSDP shard (all-gather), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t):
    """This rank's shard of a DTensor (elementwise work needs no other shard), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(full, ref):
    """`full` cut into the same shards as `ref` (a DTensor under --fsdp), or `full` itself."""
    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements) if isinstance(ref, DTensor) else full


def shard_model(model):
    """FSDP2: one unit per decoder layer and per vision block, then the root (embeddings, head,
    merger). Gradients are summed, not averaged (the losses are already divided by the global
    token count). model.state_dict() gathers whole tensors, so hf_state_dict, the vLLM push and
    save_pretrained see plain weights; every rank must call it."""
    inner = model.model
    for block in [*inner.language_model.layers, *inner.visual.blocks]:
        fully_shard(block)
    fully_shard(model)
    model._get_fsdp_state()._lazy_init()  # normally done by the first root forward; generate runs the vision tower first
    for unit in [m for m in model.modules() if isinstance(m, FSDPModule)]:  # these setters do not recurse
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    model.register_state_dict_post_hook(
        lambda module, state, prefix, meta: state.update({k: full_tensor(v).cpu() for k, v in state.items()}))


def all_reduce_grads(params, world_size):
    """Sum gradients over ranks (the losses are already divided by the global token count), in fp32: a bf16
    gradient is summed as an fp32 copy and rounded once. One call per tensor: no flat copy of all gradients
    (DDP would bucket them)."""
    for p in params if world_size > 1 else []:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        if p.grad.dtype == torch.float32:
            dist.all_reduce(p.grad)
        else:
            total = p.grad.float()
            dist.all_reduce(total)
            p.grad.copy_(total)


def global_sum(values, device):
    """A list of numbers summed over ranks, in float64 on `device` (NCCL reduces GPU tensors only)."""
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def rank_checksums(params, world_size):
    """Every rank's sum of its weights (all-gathered); a RuntimeError if the ranks hold different weights."""
    checksums = [sum(full_tensor(p.detach()).double().sum().item() for p in params)] * world_size
    if world_size > 1:
        dist.all_gather_object(checksums, checksums[0])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"ranks diverged: weight checksums {checksums}")
    return checksums
