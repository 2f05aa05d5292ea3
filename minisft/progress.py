"""Progress of the long loops (training steps, generated responses, judged entries, downloads):
tqdm's bar on a terminal; elsewhere (a log file, CI) a plain line every PLAIN_EVERY_S seconds, since
a bar's carriage returns turn a log into one unreadable line and tqdm alone would show nothing there."""
import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 30.0  # off a terminal: seconds between progress lines


def progress(total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True, file=None,
             unit_scale: bool = False):
    """A tqdm bar, or a PlainProgress where file (default: stderr, as tqdm) is not a terminal.
    unit_scale as tqdm's: counts shown as 1.4G rather than 1419000000 (for bytes)."""
    file = file or sys.stderr
    if enabled and not file.isatty():
        return PlainProgress(total, desc, unit, initial, file, unit_scale)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=file,
                unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000)


def tracked(items: list, desc: str, unit: str, enabled: bool = True):
    """Yield items, showing progress through them as progress() does."""
    with progress(len(items), desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


class PlainProgress:
    """tqdm's interface as the loops use it (update, set_postfix, write, close, with), writing
    `finetune: 12/40 steps (30%), 00:35 elapsed, about 01:20 left; loss=2.513` lines."""

    def __init__(self, total, desc, unit, initial, file, unit_scale=False):
        self.total, self.desc, self.unit, self.file, self.unit_scale = total, desc, unit, file, unit_scale
        self.n = self.start_n = initial
        self.t0 = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            print(self.line(now - self.t0), file=self.file, flush=True)

    def line(self, elapsed: float) -> str:
        done = self.n - self.start_n  # the rate is this process's: a resumed run's earlier steps took no time here
        if self.total:
            left = f", about {tqdm.format_interval(elapsed / done * (self.total - self.n))} left" if done else ""
            count = f"{self.count(self.n)}/{self.count(self.total)}{self.units} ({100 * self.n / self.total:.0f}%)"
        else:  # an unknown total (a download without Content-Length): no share, no time left
            left, count = "", f"{self.count(self.n)}{self.units}"
        return (f"{self.desc}: {count}, {tqdm.format_interval(elapsed)} elapsed{left}"
                + (f"; {self.postfix}" if self.postfix else ""))

    def count(self, n: int) -> str:
        """`12`; scaled: `1.4GB` (the unit in the number)."""
        return tqdm.format_sizeof(n, suffix=self.unit, divisor=1024) if self.unit_scale else str(n)

    @property
    def units(self) -> str:
        """After unscaled counts: `steps`, `entries`; scaled counts carry their unit."""
        if self.unit_scale:
            return ""
        return " " + (self.unit[:-1] + "ies" if self.unit.endswith("y") else self.unit + "s")

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    @staticmethod
    def write(text: str) -> None:
        print(text, flush=True)  # stdout, as tqdm.write

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
