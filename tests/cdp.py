"""A headless Chromium driven over the Chrome DevTools Protocol on a pipe (--remote-debugging-pipe:
JSON messages ending in a NUL byte, commands on the browser's fd 3, replies on its fd 4), so a test
can drive a page without a websocket library or a browser download."""
import base64
import json
import os
import subprocess
import time

CHROMIUM = "/usr/bin/chromium"  # Debian's package


class Browser:
    def __init__(self, profile_dir, width=900, height=640):
        to_browser, from_browser = os.pipe(), os.pipe()      # (read, write) each

        def fds():  # in the child, before exec: the pipe ends become fds 3 and 4 (dup2 makes them inheritable)
            os.dup2(to_browser[0], 3)
            os.dup2(from_browser[1], 4)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser[0])
        os.close(from_browser[1])
        self.out, self.inp = os.fdopen(to_browser[1], "wb"), os.fdopen(from_browser[0], "rb")
        self.next_id, self.session, self.size = 0, None, (width, height)

    def send(self, method, params=None):
        """A command (to the attached page, once open() ran) -> its result; events are skipped."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        self.out.flush()
        while True:
            reply = json.loads(self._read())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> bytes:
        data = bytearray()
        while not data.endswith(b"\0"):
            byte = self.inp.read(1)
            if not byte:
                raise RuntimeError("chromium closed its DevTools pipe")
            data += byte
        return bytes(data[:-1])

    def open(self, url):
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        width, height = self.size  # the page's viewport exactly (the window also holds the browser's frame)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def eval(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.eval(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never reached: {expression}")
            time.sleep(0.05)

    def screenshot(self, path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(png)
        return png

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.out.close()
        self.inp.close()
