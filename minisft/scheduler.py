"""Continuous batching: one thread decodes every running request together, one token per request
per step, and admits waiting requests between steps.

A request is a Job: prompt token ids, how to sample, when to stop. The scheduler keeps the running
jobs in the rows of one KV cache, in order. Each step:

    admit    waiting jobs join (up to max_batch running), one client at a time in turn (a bounded
             queue, a bounded share of it per client): their prompts are prefilled together
             into new cache rows (GPT.kv_cache_extend); the running rows are left as they are
    sample   one token per job from its row of logits, with the job's own generator (so a job's
             tokens do not depend on what else is running)
    push     the job turns the token into text and hands it to whoever waits on job.events
    leave    jobs that ended (end-of-text, a stop string, max_tokens, the client gone) leave the
             cache (GPT.kv_cache_keep)
    decode   the rest advance one position together (GPT.decode)

A long prompt admitted mid-flight delays the running jobs by its prefill; nothing else waits.
Generation never outgrows the context: a job's max_tokens is at most the context length minus its
prompt (the request layer checks that), so the cache never needs the uncached sliding window.
"""
import logging
import queue
import threading
from collections import Counter, deque

import numpy as np

from .batch import pack_sequences
from .generate import sample_next
from .tokenizer import EOT, TextPieces

log = logging.getLogger("minisft.serve")


class _StopString:
    """One stop string's Knuth-Morris-Pratt matcher: state is the length of the longest prefix of the
    stop string that the text fed so far ends with. Each character costs O(1) amortized, so a long
    answer is never searched again from its start."""

    def __init__(self, s):
        self.s, self.state = s, 0
        self.back = [0] * len(s)  # back[i]: the longest proper prefix of s[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = self.back[k - 1]
            k += s[i] == s[k]
            self.back[i] = k

    def feed(self, text, start, end) -> int:
        """Feed text[start:end] -> the index just past the first match in it, or -1."""
        s, k = self.s, self.state
        for i in range(start, end):
            while k and text[i] != s[k]:
                k = self.back[k - 1]
            k += text[i] == s[k]
            if k == len(s):
                self.state = k
                return i + 1
        self.state = k
        return -1


class _StopText:
    """Decoded text of the tokens so far, released as it becomes final: held back while it ends in
    part of a UTF-8 character (tokenizer.TextPieces) or in the start of a stop string, and cut
    where a stop string begins. Each new character is looked at once per stop string."""

    def __init__(self, decode, stops):
        self.pieces, self.stops = TextPieces(decode), [_StopString(s) for s in stops]
        self.fed = 0      # how much of the text the stop matchers have seen
        self.end = None   # where a stop string cut the text

    def add(self, token) -> tuple:
        """-> (text newly final, whether a stop string ended the text)."""
        safe = self.pieces.add(token)
        text = self.pieces.text
        ends = [(end - len(m.s)) for m in self.stops if (end := m.feed(text, self.fed, safe)) >= 0]
        self.fed = safe
        if ends:  # several stop strings in one token's text: the text ends where the first begins
            self.end = min(ends)
            return self.pieces.release(self.end), True
        held = max((m.state for m in self.stops), default=0)
        return self.pieces.release(safe - held), False

    def flush(self) -> str:
        """The rest of the text, once no token will follow."""
        return self.pieces.release(len(self.pieces.text) if self.end is None else self.end)


class Job:
    """One request's generation. Events on job.events, in order: ("text", str) as text becomes
    final, then ("done", finish_reason) or ("error", message). finish_reason: "stop" (end-of-text
    or a stop string), "length" (max_tokens), "cancelled" (cancel() was called)."""

    def __init__(self, prompt, max_tokens, decode, *, temperature=0.0, top_k=None, top_p=None, stop=(),
                 seed=None, stops=(EOT,)):
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.rng, self.stops = np.random.default_rng(seed), tuple(stops)  # the ids that end the answer
        self.text = _StopText(decode, list(stop))
        self.tokens = []                 # generated ids, end-of-text excluded
        self.completion_tokens = 0       # every sampled token, end-of-text included
        self.finish_reason = None
        self.events = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating (the client went away); the scheduler frees the job's row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, token) -> bool:
        """Take the sampled token -> whether the job goes on."""
        if self.cancelled:
            return self.finish("cancelled")
        self.completion_tokens += 1
        if token in self.stops:
            return self.finish("stop")
        self.tokens.append(token)
        text, stopped = self.text.add(token)
        if text:
            self.events.put(("text", text))
        if stopped:
            return self.finish("stop")
        if len(self.tokens) >= self.max_tokens:
            return self.finish("length")
        return True

    def fail(self, message) -> None:
        self.finish_reason = "error"
        self.events.put(("error", message))

    def finish(self, reason) -> bool:
        """End the job (the text held back is released, unless it was cancelled) -> False."""
        rest = self.text.flush() if reason != "cancelled" else ""
        if rest:
            self.events.put(("text", rest))
        self.finish_reason = reason
        self.events.put(("done", reason))
        return False


class QueueFull(Exception):
    """Scheduler.submit: no room for another waiting job (in all, or for that client)."""


class Scheduler:
    """Owns the model; step() runs one step, run() steps until stop() (in a daemon thread after
    start())."""

    def __init__(self, model, max_batch=16, max_waiting=256, max_waiting_per_client=32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.max_waiting, self.max_waiting_per_client = max_waiting, max_waiting_per_client
        # client -> its waiting jobs, oldest first. The dict's order is the clients' turn: a client
        # whose job is admitted goes to the back, so admission goes round the clients, not down one
        # queue of every request (where a client with 100 requests queued delays everyone by 100).
        self._waiting: dict = {}
        self._n_waiting = 0
        self._lock = threading.Condition()
        self.finished = Counter()   # finish_reason -> jobs that ended so
        self.peak_batch = 0         # the most jobs decoded in one step
        self._reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="minisft-scheduler", daemon=True)

    def submit(self, job: Job, client="") -> Job:
        """Queue the job for client (any hashable name) -> job; QueueFull when the queue, or that
        client's share of it, is full."""
        with self._lock:
            mine = self._waiting.get(client, ())
            if len(mine) >= self.max_waiting_per_client:
                raise QueueFull(f"this client has {len(mine)} requests waiting already, its share of the queue")
            if self._n_waiting >= self.max_waiting:
                raise QueueFull(f"{self._n_waiting} requests are waiting already, as many as the queue holds")
            self._waiting.setdefault(client, deque()).append(job)
            self._n_waiting += 1
            self._lock.notify()
        return job

    @property
    def n_waiting(self) -> int:
        """Jobs submitted and not yet admitted."""
        return self._n_waiting

    def _next_waiting(self, wait) -> Job | None:
        """The oldest waiting job of the client whose turn it is (None if none comes within wait seconds)."""
        with self._lock:
            if not self._waiting and wait:
                self._lock.wait(wait)
            if not self._waiting:
                return None
            client = next(iter(self._waiting))
            jobs = self._waiting.pop(client)
            job = jobs.popleft()
            if jobs:
                self._waiting[client] = jobs  # to the back of the turn
            self._n_waiting -= 1
            return job

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _admit(self, n_running) -> list:
        """Waiting jobs that fit (blocks briefly while nothing runs)."""
        jobs = []
        while n_running + len(jobs) < self.max_batch:
            job = self._next_waiting(0.1 if n_running + len(jobs) == 0 else 0)
            if job is None:
                break
            if job.cancelled:  # gone before it started
                job.finish("cancelled")
                self.finished[job.finish_reason] += 1
            else:
                jobs.append(job)
        return jobs

    def run(self) -> None:
        while not self._stop.is_set():
            self.step()

    def step(self) -> None:
        """One scheduling step: admit, sample, push, leave, decode (see the module docstring)."""
        model = self.model
        try:
            new = self._admit(len(self.running))
            if new:
                fresh = model.kv_cache_extend(self.cache, pack_sequences([j.prompt for j in new]))  # (S_new, V)
                self.logits = np.concatenate([self.logits, fresh]) if self.running else fresh    # (S, V)
                self.running += new
            if not self.running:
                return
            self.peak_batch = max(self.peak_batch, len(self.running))
            going = []
            for row, job in enumerate(self.running):
                token = int(sample_next(self.logits[row:row + 1], job.rng, **job.sampling)[0])
                if job.push(token):
                    going.append(row)
                else:
                    self.finished[job.finish_reason] += 1
                    log.debug("job ended (%s) after %d tokens", job.finish_reason, job.completion_tokens)
            if len(going) < len(self.running):
                model.kv_cache_keep(self.cache, going)
                self.running = [self.running[r] for r in going]
            if self.running:
                self.logits = model.decode(self.cache, [j.tokens[-1] for j in self.running])    # (S, V)
        except Exception as e:  # a failed step fails its jobs, not the server
            log.exception("decoding step failed")
            for job in self.running:
                job.fail(f"generation failed: {type(e).__name__}: {e}")
                self.finished["error"] += 1
            self._reset()

    def _reset(self) -> None:
        self.cache = self.model.kv_cache(0, self.model.cfg.context_length)
        self.running, self.logits = [], None   # the running jobs in cache-row order, their logits (S, V)
