"""Make a benchmark plugin process end when the benchmark worker that started it goes away."""

import os
import signal
import threading
import time


def exit_with_parent() -> None:
    """SIGTERM ourselves (a clean stop) once our parent is gone; hard exit 3 s later."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
