"""A run directory (`finetune --out`) is owned, checked and recovered here, before training starts.

    run.lock      held (an exclusive flock) for the run's whole life, naming its PID and host; the
                  kernel drops the flock when the process dies however it dies, so a lock left by a
                  killed run is recognised as stale and taken over with a message
    resume        the run is continued only with the settings it was saved with: a difference in a
                  setting that changes the result is refused, naming each setting and both values;
                  AMENDABLE settings (how long the run goes, how often it saves and reports) may be
                  changed explicitly and are recorded in settings.json under "amendments"
    recovery      temp files of writes a dead run never finished are removed; a folder whose run
                  died before its first checkpoint starts afresh; --resume takes the newest
                  checkpoint that loads and names the ones it skipped and why

Nothing in the folder is written before these checks pass (the lock file aside).
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import h5py

from .errors import MinisftError
from .files import write_json

LOCK = "run.lock"
# Settings a resume may change when asked to: they decide how long the run goes and what it saves
# or reports, not what a step computes. backend and device change the rounding of every step, not
# the computation (the parity tests bound the difference); a resume that amends them is no longer
# bitwise equal to an uninterrupted run, which the amendment in settings.json records.
AMENDABLE = ("epochs", "max_steps", "ckpt_every", "eval_freq", "eval_iter", "keep_last", "responses",
             "max_new_tokens", "early_stop", "export", "backend", "device")
# Settings that say where things are or what this invocation does: never compared.
UNCOMPARED = ("out", "resume", "overwrite", "cache_dir")
# What a run writes into its folder, removed by --overwrite (any other file there is left alone).
RUN_FILES = ("settings.json", "metrics.jsonl", "summary.json", "instruction-data-with-response.json",
             "loss-plot.png")
RUN_DIRS = ("checkpoints", "hf", "adapter")  # hf/: a full run's export; adapter/: a LoRA run's


# ---- the folder -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def removed_if_refused(out: Path):
    """`with removed_if_refused(out):` a run that fails while its folder is still empty removes the
    folders it created (out and its new parents): a refused run leaves nothing behind. A folder that
    existed before, or one the run wrote into, stays."""
    new = [p for p in (out, *out.parents) if not p.exists()]  # out first, then the parents it creates
    try:
        yield
    except BaseException:
        for p in new:
            try:
                p.rmdir()
            except OSError:  # not empty: the run wrote into it (or another process did)
                break
        raise


# ---- the lock ------------------------------------------------------------------------------------------
class RunLock:
    """`with RunLock(out, log):` holds out/run.lock, or raises MinisftError naming its holder."""

    def __init__(self, out, log=print):
        self.path, self.log, self.fd = Path(out) / LOCK, log, None

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise MinisftError(f"{self.path}: the run folder is in use by {holder(self.path)}; wait for "
                                   "it to finish or choose another --out") from None
            # The file we locked may have been removed by its previous owner in the meantime: then
            # the lock is on a name nobody else sees, and we try again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_lock(fd)
        if old.get("host") not in (None, me["host"]):
            os.close(fd)  # flock does not reach across machines (NFS): we cannot tell whether it runs
            raise MinisftError(f"{self.path}: the run folder is in use by pid {old.get('pid')} on host "
                               f"{old['host']} (another machine: minisft cannot tell whether it still runs); "
                               f"if it does not, delete {self.path}")
        if old:
            self.log(f"taking over the stale lock {self.path} of pid {old.get('pid')} on {old.get('host')} "
                     f"(started {old.get('started')}): that process is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # while still held: nobody can lock the name in between
        os.close(self.fd)
        self.fd = None


def _read_lock(fd) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}
    return info if isinstance(info, dict) else {}


def holder(path) -> str:
    """The lock's owner in words, as far as the file says."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it is just starting)"


# ---- checks before a run starts -------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """What finetune does with the folder: the checkpoints to try newest first (empty: a fresh run),
    the amendments to record, whether an earlier run's files are removed first."""
    checkpoints: list
    amendments: list
    clear: bool


def checkpoints(out: Path) -> list:
    return sorted((Path(out) / "checkpoints").glob("step-*.h5"))


def saved_settings(out) -> dict:
    """The settings a run in out was last started with (settings.json), {} when there are none."""
    try:
        saved = json.loads((Path(out) / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    saved.pop("amendments", None)
    return saved


def plan_run(s, log=print) -> Plan:
    """Refuse (MinisftError) or plan the run s in its folder; reads only. Call holding the lock."""
    out = Path(s.out)
    found = checkpoints(out)
    if not s.resume:
        if not (out / "metrics.jsonl").exists() and not (out / "settings.json").exists() and not found:
            return Plan([], [], clear=False)
        if s.overwrite:
            log(f"--overwrite: removing the earlier run's files in {out}")
            return Plan([], [], clear=True)
        if not found:
            log(f"{out} holds a run that died before its first checkpoint; starting it afresh")
            return Plan([], [], clear=True)
        raise MinisftError(f"setting out: {out} already holds a run (newest checkpoint {found[-1].name}); pass "
                           "--resume to continue it, --overwrite to discard it and start over, or choose another --out")
    if not found:
        raise MinisftError(f"setting resume: {out} has no checkpoint to resume from; run without --resume to "
                           "start it afresh")
    good, skipped = [], []
    for path in reversed(found):
        try:
            state = read_train_state(path)
        except MinisftError as e:
            skipped.append(f"{path.name} ({e})")
            continue
        good.append((path, state))
    if not good:
        raise MinisftError(f"setting resume: no checkpoint in {out / 'checkpoints'} can be read: "
                           + "; ".join(skipped) + "; start afresh with --overwrite")
    for why in skipped:
        log(f"skipping the damaged checkpoint {why}")
    path, state = good[0]
    amendments = compare(s, state.get("settings", {}), path, state.get("step"))
    return Plan([p for p, _ in good], amendments, clear=False)


def read_train_state(path) -> dict:
    """A checkpoint's train_state, after the cheap checks (HDF5 opens, completion marker set)."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise MinisftError("incomplete: its completion marker is missing")
            state = json.loads(f["train_state"].asstr()[()])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise MinisftError(f"cannot be read: {e}") from None
    if not isinstance(state, dict):
        raise MinisftError("its train_state is not a JSON object")
    return state


def compare(s, saved: dict, path, step) -> list:
    """The saved run's settings against this resume's: refuse any difference outside AMENDABLE;
    -> the amendments [{"step", "setting", "from", "to"}]."""
    from .settings import FIELDS

    now = s.to_dict()
    refused, amended = [], []
    for name, f in FIELDS.items():
        if name in UNCOMPARED:
            continue
        # A setting newer than the saved run: it ran with the default.
        was = saved.get(name, f.default)
        if was == now[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if name in AMENDABLE:
            amended.append({"step": step, "setting": name, "from": was, "to": now[name]})
        else:
            refused.append(f"{flag} was {was!r}, now {now[name]!r}")
    if refused:
        raise MinisftError(f"setting resume: {path} was trained with other settings: {'; '.join(refused)}. A "
                           "resume continues the saved run exactly; start a new run (another --out, or "
                           "--overwrite) to change them")
    return amended


# ---- starting --------------------------------------------------------------------------------------------
def remove_strays(out: Path, log=print) -> None:
    """Temp files of writes that never finished (a killed run): nobody else writes here while we hold
    the lock, so every one is garbage."""
    strays = [p for folder in (out, out / "checkpoints", out / "hf") if folder.is_dir()
              for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name and p.is_file()]
    for p in strays:
        p.unlink(missing_ok=True)
    if strays:
        size = len(strays)
        log(f"removed {size} unfinished temp file{'s' * (size > 1)} of an earlier run: "
            + ", ".join(p.name for p in strays[:4]) + (" ..." if size > 4 else ""))


def start(s, plan: Plan, log=print, record: dict | None = None) -> None:
    """Apply the plan: clear an earlier run if asked, remove strays, write settings.json with the
    amendments of this and earlier resumes (and record: what the run is, e.g. its world size)."""
    out = Path(s.out)
    remove_strays(out, log)
    if plan.clear:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    history = []
    if s.resume:
        try:
            history = json.loads((out / "settings.json").read_text(encoding="utf-8")).get("amendments", [])
        except (OSError, ValueError, AttributeError):
            history = []
    for a in plan.amendments:
        log(f"amending {a['setting']}: {a['from']!r} -> {a['to']!r} from step {a['step']} on")
    amendments = history + plan.amendments
    write_json(out / "settings.json", {**s.to_dict(), **(record or {}),
                                       **({"amendments": amendments} if amendments else {})}, indent=2)
