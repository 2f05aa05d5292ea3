"""Data-parallel training on torch.distributed: `torchrun --nproc-per-node N -m minisft finetune ...`.

torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) starts one process per
rank; every rank builds the same model and walks the same global batch sequence (the Loader's order
and position are global), and takes its own slice of every batch:

    global batch of b sequences, W ranks:   rank r trains on sequences [r*b/W, (r+1)*b/W)

Per optimizer step, three all-reduces:
    1. the counts: each rank's valid targets and tokens, so every micro-batch gradient is scaled by
       1/(valid targets of the whole global window) before the backward, as one process scales it;
    2. the gradients, summed in buckets of about BUCKET_BYTES (each bucket in flight while the next
       is packed): sum_r (1/n_global) * grad_r = the single-process gradient, so every rank clips
       and applies the identical AdamW update and the weights stay equal without being sent;
    3. the loss sums (a host scalar), for the logged loss.
Only trained tensors are reduced (model.grads omits frozen ones). Evaluation is sharded the same way
and its (loss_sum, n_valid) pairs reduced, so each batch's mean is the single-process one.

Rank 0 alone reads a checkpoint to resume and writes settings, metrics, checkpoints, export,
responses and the plot; it broadcasts the weights, Adam moments and the loop's position at the
start, so the other ranks need neither the run directory nor the same file system. Checks that can
fail (out directory, resume, settings equal on every rank, batch size divisible by the world size)
are decided before any work and refused on every rank alike.

Faults: a collective that fails (a peer closed its connection, or nothing arrived within
dist_timeout) becomes a MinisftError naming the rank that is gone: the survivors mark themselves in
the rendezvous store and wait LOST_WINDOW_S for the others; whoever is unmarked is named.

numpy and numba reduce their own arrays through gloo (torch.from_numpy shares the memory); torch on
CUDA uses NCCL, torch on CPU gloo. torch is imported only here and only when WORLD_SIZE > 1.
"""
import os
import re
import time
from datetime import timedelta

import numpy as np

from .errors import MinisftError

BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb: big enough to amortise each call
LOST_WINDOW_S = 5.0        # how long a survivor waits for the others to answer after a failed collective


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MinisftError(f"environment WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def start(s):
    """One process (Local), or this rank of a distributed job (Ranks) when WORLD_SIZE > 1."""
    return Ranks(s) if world_size_from_env() > 1 else Local()


class Local:
    """One process: every reduction is the identity, and this process is rank 0."""
    rank, world_size, main = 0, 1, True

    def __init__(self):
        self.valid_per_rank = [0]  # target tokens trained on by each rank in this run

    def describe(self) -> str:
        return "one process"

    def record(self) -> dict:
        return dict(world_size=self.world_size)

    def shard(self, collate):
        return collate

    def agree(self, check) -> None:
        check()

    def sync_start(self, model, opt, loader, position):
        return position

    def count(self, window) -> tuple:
        """(valid targets, tokens) of the global window."""
        valid = sum(b.num_valid for b in window)
        self.valid_per_rank[0] += valid
        return valid, sum(b.num_tokens for b in window)

    def reduce_gradients(self, model, loss_sum: float) -> float:
        return loss_sum

    def eval_sums(self, pairs: list) -> list:
        return pairs

    def close(self) -> None:
        pass


class Ranks(Local):
    def __init__(self, s):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        if not dist.is_available():
            raise MinisftError("WORLD_SIZE > 1 asks for a distributed run, but this torch build has no "
                               "torch.distributed")
        self.rank, self.world_size = int(os.environ.get("RANK", "0")), world_size_from_env()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.valid_per_rank = [0] * self.world_size
        self.reduce_backend = "gloo"
        if s.backend == "torch" and (s.device or "cpu").startswith("cuda"):
            if s.device != "cuda":
                raise MinisftError(f"setting device: {s.device} would put every rank on one GPU; pass "
                                   "--device cuda and each rank takes the GPU of its LOCAL_RANK")
            torch.cuda.set_device(self.local_rank)
            self.reduce_backend = "nccl"
        timeout = timedelta(seconds=s.dist_timeout)
        try:
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
            dist.init_process_group(self.reduce_backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)
        except (RuntimeError, ValueError) as e:  # no MASTER_ADDR/PORT, nobody there, a rank never came
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise MinisftError(f"rank {self.rank} of {self.world_size} could not join the run at {where}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        self.store = dist.PrefixStore("minisft/", store)
        # Host values (counts, losses, objects) go over gloo even when the gradients go over NCCL.
        self.host = dist.new_group(backend="gloo", timeout=timeout) if self.reduce_backend == "nccl" else None
        self.buckets = None
        theirs = [None] * self.world_size
        self._call("comparing the settings", dist.all_gather_object, theirs, s.to_dict(), group=self.host)
        for r, other in enumerate(theirs):
            diff = [k for k in sorted(set(other) | set(theirs[0])) if other.get(k) != theirs[0].get(k)]
            if diff:
                self.close()
                k = diff[0]
                raise MinisftError(f"settings differ between ranks: rank {r} has {k}={other.get(k)!r}, rank 0 "
                                   f"{k}={theirs[0].get(k)!r} ({len(diff)} setting(s) differ); start every "
                                   "rank with the same settings")
        if s.batch_size % self.world_size:
            self.close()
            raise MinisftError(f"setting batch_size: {s.batch_size} sequences cannot be split evenly over "
                               f"{self.world_size} ranks; choose a multiple of the world size")

    def describe(self) -> str:
        return (f"{self.world_size} ranks, this is rank {self.rank} (local rank {self.local_rank}); "
                f"gradients all-reduced over {self.reduce_backend}")

    def record(self) -> dict:
        return dict(world_size=self.world_size, reduce_backend=self.reduce_backend)

    def shard(self, collate):
        """collate for this rank's slice of every batch (the last, short batch of an evaluation may
        leave some ranks nothing)."""
        def mine(examples):
            k = -(-len(examples) // self.world_size)
            return collate(examples[self.rank * k:(self.rank + 1) * k])
        return mine

    def agree(self, check) -> None:
        """Run check() on rank 0; if it refuses, every rank refuses with its message."""
        why = [None]
        if self.main:
            try:
                check()
            except MinisftError as e:
                why = [str(e)]
        self._call("agreeing to start", self.dist.broadcast_object_list, why, src=0, group=self.host)
        if why[0]:
            self.close()
            raise MinisftError(why[0])

    def sync_start(self, model, opt, loader, position):
        """Rank 0's weights, Adam moments and loop position (a picklable record) on every rank (a
        resume reads the checkpoint on rank 0 only)."""
        for group in (model.params, *opt.moments.values()):
            for name, a in group.items():
                self._call(f"broadcasting {name}", self.dist.broadcast, self._tensor(a), src=0)
        state = [(position, loader.state_dict(), opt.step_count)]
        self._call("broadcasting the loop's position", self.dist.broadcast_object_list, state, src=0,
                   group=self.host)
        position, loader_state, opt.step_count = state[0]
        loader.load_state_dict(loader_state)
        return position

    def count(self, window) -> tuple:
        t = self.torch.zeros(self.world_size + 1, dtype=self.torch.int64)  # (W+1,) valid per rank, tokens
        t[self.rank] = sum(b.num_valid for b in window)
        t[-1] = sum(b.num_tokens for b in window)
        self._call("counting the targets", self.dist.all_reduce, t, group=self.host)
        counts = t.tolist()
        self.valid_per_rank = [a + b for a, b in zip(self.valid_per_rank, counts)]
        return sum(counts[:-1]), counts[-1]

    def reduce_gradients(self, model, loss_sum: float) -> float:
        """Sum every trained gradient over the ranks (in place: model.grads become views of the
        bucket buffers) -> the global loss sum."""
        if self.buckets is None:
            self.buckets = self._plan(model)
        works = []
        for buf, names in self.buckets:
            offset = 0
            for n in names:
                g = model.grads.get(n)
                size = int(np.prod(model.params[n].shape))
                part = buf[offset:offset + size]
                if g is None:  # this rank's slice had no valid targets: it contributes zeros
                    part[:] = 0
                else:
                    part[:] = g.reshape(-1)
                model.grads[n] = part.reshape(model.params[n].shape)
                offset += size
            works.append(self._call("the gradient all-reduce", self.dist.all_reduce, self._tensor(buf),
                                    async_op=True))
        loss = self.torch.tensor([loss_sum], dtype=self.torch.float64)
        self._call("the loss all-reduce", self.dist.all_reduce, loss, group=self.host)
        for w in works:
            self._call("the gradient all-reduce", w.wait)
        return loss.item()

    def eval_sums(self, pairs: list) -> list:
        t = self.torch.tensor(pairs, dtype=self.torch.float64).reshape(-1, 2)  # (batches, 2) loss_sum, n_valid
        self._call("the evaluation all-reduce", self.dist.all_reduce, t, group=self.host)
        return [(a, int(round(n))) for a, n in t.tolist()]

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    # ---- internals ---------------------------------------------------------------------------------
    def _plan(self, model) -> list:
        """Buckets of trained parameters in model order, about BUCKET_BYTES each, one dtype per
        bucket: [(flat buffer, names)], the buffers allocated once for the run."""
        names = [n for n in model.params if n not in model.frozen]
        groups, cur, cur_bytes = [], [], 0
        for n in names:
            p = model.params[n]
            if cur and (cur_bytes >= BUCKET_BYTES or p.dtype != model.params[cur[0]].dtype):
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append(n)
            cur_bytes += p.nbytes
        if cur:
            groups.append(cur)
        buckets = []
        for group in groups:
            p, size = model.params[group[0]], sum(int(np.prod(model.params[n].shape)) for n in group)
            if isinstance(p, np.ndarray):
                buf = np.empty(size, dtype=p.dtype)                                      # (size,)
            else:
                buf = self.torch.empty(size, dtype=p.dtype, device=p.device)             # (size,)
            buckets.append((buf, group))
        return buckets

    def _tensor(self, a):
        """A torch tensor sharing a's memory (numpy arrays through torch.from_numpy)."""
        return self.torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    def _call(self, what, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RuntimeError as e:  # torch.distributed's DistError and its kinds are RuntimeErrors
            raise MinisftError(self._lost(what, e)) from None

    def _lost(self, what, err) -> str:
        """Who is gone: every survivor marks itself in the store and waits for the others."""
        # gloo's and NCCL's first sentence, without the C++ source location in front of it.
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else "")
        first = text.split(". ")[0].rstrip(".") or type(err).__name__
        try:
            self.store.set(f"alive/{self.rank}", "1")
            deadline = time.monotonic() + LOST_WINDOW_S
            while True:
                missing = [r for r in range(self.world_size) if not self.store.check([f"alive/{r}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # the store itself is gone: it lives with rank 0 unless an agent holds it
            missing = [0]
        who = (f"rank {', '.join(map(str, missing))} of {self.world_size} is lost (it stopped answering)"
               if missing else f"every rank of {self.world_size} still answers, yet a collective failed")
        return (f"distributed run stopped on rank {self.rank}: {who}; {what} failed with: {first}. "
                "Continue from the last checkpoint with --resume (with any world size that divides batch_size)")
