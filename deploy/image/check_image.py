"""`make image-test`: run the gradserve image and check it from the host, as a user would.

1. The image runs as a non-root user and carries no compiler.
2. `podman run` with its default command (gradserve serve --host 0.0.0.0), published on a free
   127.0.0.1 port; the SDK waits until the health service reports SERVING.
3. The SDK's gradient of the bundled model tracks the true 8(x - 0.5) (a ReLU fit: a staircase
   within the tolerance the test suite uses).
4. With 20 calls queued (the server holds batches for 1 s), SIGTERM: every call is answered,
   the log says the drain finished, and the container exits 0.

Exits 0 when every check passes; the container is removed in any case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import numpy as np

from gradserve.client import GradientClient, RetryPolicy

READY_TIMEOUT_S = 180
EXIT_TIMEOUT_S = 60
COMPILERS = ("gcc", "cc", "c++", "clang", "g++")


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    run = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed: {run.stderr.strip()}")
    return run.stdout.strip()


def container_logs(container: str) -> str:
    """The container's output; podman replays its stderr on stderr, so both are read."""
    run = subprocess.run(
        ["podman", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    return run.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_contents(image: str) -> None:
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image)
    assert user and user.split(":")[0] not in ("", "0", "root"), f"image runs as {user!r}"
    found = podman(
        "run", "--rm", "--entrypoint", "/bin/sh", image, "-c",
        f"id -u; for c in {' '.join(COMPILERS)}; do command -v $c; done; ls -d /root/.cache "
        "/tmp/wheels 2>/dev/null; true",
    ).split()  # fmt: skip
    assert found[0] != "0", "the container runs as root"
    assert found[1:] == [], f"the image holds build leftovers: {found[1:]}"
    print(f"ok: runs as user {user}, no compiler, no wheel or pip cache")


def check_gradient(client: GradientClient) -> None:
    x = np.linspace(0.05, 0.95, 37)
    served = client.evaluate(x).dy_dx[:, 0]
    error = np.abs(served - 8 * (x - 0.5))
    assert error.mean() < 0.2 and error.max() < 0.5, f"gradient off 8(x-0.5): {error}"
    print(f"ok: gradient tracks 8(x-0.5) (mean error {error.mean():.3f}, max {error.max():.3f})")


def check_drain(client: GradientClient, container: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        calls = [pool.submit(client.evaluate, [[0.6]] * 3) for _ in range(20)]
        time.sleep(0.3)  # sent and queued, still held
        podman("kill", "--signal", "TERM", container)
        answers = [c.result(timeout=60) for c in calls]
    assert all(abs(a.dy_dx[0, 0] - 0.8) < 0.3 for a in answers)
    code = int(podman("wait", container, timeout=EXIT_TIMEOUT_S))
    logs = container_logs(container)
    assert "every accepted request answered" in logs, logs[-2000:]
    assert code == 0, f"exit code {code}\n{logs[-2000:]}"
    print("ok: SIGTERM with 20 calls in flight: all answered, drained, exit code 0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image")
    image = parser.parse_args().image
    started = time.monotonic()
    check_contents(image)
    port = free_port()
    container = f"gradserve-image-test-{os.getpid()}"
    podman(
        "run", "--detach", "--name", container, "--publish", f"127.0.0.1:{port}:50051",
        "--env", "GRADSERVE_MAX_DELAY_US=1000000", "--env", "GRADSERVE_DRAIN_SECONDS=30",
        image,
    )  # fmt: skip
    try:
        # One attempt per call: a retry must not hide a request lost in the drain.
        with GradientClient(f"127.0.0.1:{port}", timeout=30, retry=RetryPolicy(attempts=1)) as c:
            c.wait_until_ready(READY_TIMEOUT_S)
            print(f"ok: SERVING after {time.monotonic() - started:.1f} s")
            check_gradient(c)
            check_drain(c, container)
    except BaseException:
        print(container_logs(container)[-3000:], file=sys.stderr)
        raise
    finally:
        podman("rm", "--force", "--ignore", container, check=False)
    print(f"image-test passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
