"""Progress of the long loops (training steps, generated responses): tqdm's bar on a terminal;
elsewhere (a log file, CI) a plain line every PLAIN_EVERY_S seconds, since a bar's carriage
returns turn a log into one unreadable line and tqdm alone would show nothing there."""
import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 30.0  # off a terminal: seconds between progress lines


def progress(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True, file=None):
    """A tqdm bar, or a PlainProgress where file (default: stderr, as tqdm) is not a terminal."""
    file = file or sys.stderr
    if enabled and not file.isatty():
        return PlainProgress(total, desc, unit, initial, file)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=file)


class PlainProgress:
    """tqdm's interface as the loops use it (update, set_postfix, write, close, with), writing
    `finetune: 12/40 steps (30%), 00:35 elapsed, about 01:20 left; loss=2.513` lines."""

    def __init__(self, total, desc, unit, initial, file):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
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
        left = f", about {tqdm.format_interval(elapsed / done * (self.total - self.n))} left" if done else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%), "
                f"{tqdm.format_interval(elapsed)} elapsed{left}" + (f"; {self.postfix}" if self.postfix else ""))

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
