"""Load for the demo: a few threads request URL over and over until stopped.

    python load.py URL [--threads N] [--max-seconds S]

Stops on SIGTERM, Ctrl-C, or after --max-seconds (a safety net, so it never outlives
the demo for long). Prints how many requests were made when it stops.
"""

import argparse
import signal
import sys
import threading
import time
import urllib.request

stop = threading.Event()


def worker(url, counts, index):
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
            counts[index] += 1
        except OSError:
            if stop.wait(0.2):  # the app is gone or not answering: back off
                break


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    counts = [0] * args.threads
    threads = [
        threading.Thread(target=worker, args=(args.url, counts, i), daemon=True)
        for i in range(args.threads)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    # Sleep, not stop.wait(): the signal handler sets `stop`, and must never find the
    # main thread holding the event's lock.
    while not stop.is_set() and time.monotonic() - started < args.max_seconds:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    print(f"load: {sum(counts)} requests to {args.url} in {time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
