"""How fast the HTML flame graph of a large profile opens and answers, in headless Chromium.

A synthetic CPU profile of 100k samples over 20k call-tree nodes is written with
write_flamegraph: stacks 36 frames deep on average, up to 85, that go from native start-up
code through Python into C and the kernel, as a busy Python service's do. The page is
loaded --runs times; each time it records performance.now() when the graph is first drawn
(window.flamegraphFirstPaintMs: from navigation start, so reading the file and parsing
HTML and JSON are included). Then a click on a frame (zoom) and typing a search term are
each timed --runs times, from the event to the browser's next frame after the repaint
(requestAnimationFrame, then a task), and the event handler alone. Printed: the
profile's size, the file's size, medians.

    .venv/bin/python bench/flamegraph_paint.py [--runs 5] [--samples 100000] [--nodes 20000] [--keep FILE.html]

Needs chromium, its chromedriver and selenium (sudo scripts/setup --test); not root.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from _proc import ToolMissing, run_main

from bpfprof.collector.output.flamegraph import write_flamegraph
from bpfprof.collector.profile import Labels, Profile, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module, Stack

HZ = 99
MAX_DEPTH = 100
KERNEL_DEPTH = 14  # kernel stacks seen under a syscall are rarely deeper

# A kind's callees: Python calls Python or into C; C calls C, the kernel, or back into Python.
CALLEES = {
    FrameKind.PYTHON: ((FrameKind.PYTHON, 0.85), (FrameKind.NATIVE, 0.15)),
    FrameKind.NATIVE: ((FrameKind.NATIVE, 0.6), (FrameKind.KERNEL, 0.25), (FrameKind.PYTHON, 0.15)),
    FrameKind.KERNEL: ((FrameKind.KERNEL, 1.0),),
}
START = [Frame(FrameKind.NATIVE, name, Module("/usr/bin/python3.11"), 0x1000 + 0x100 * i)
         for i, name in enumerate(("_start", "__libc_start_main", "Py_BytesMain", "Py_RunMain"))]


def function_pools(rng: random.Random) -> Dict[FrameKind, List[Frame]]:
    """Functions to call, with the names, files and modules real ones have."""
    words = ["parse", "render", "load", "fetch", "encode", "decode", "handle", "dispatch", "query",
             "compute", "update", "validate", "serialize", "flush", "read", "write", "lookup", "merge"]
    nouns = ["request", "row", "item", "header", "token", "block", "page", "node", "batch", "frame"]
    python = []
    for i in range(3000):
        file = f"/srv/app/pkg{i % 40}/module{i % 150}.py"
        start = 10 + (i * 37) % 900
        name = f"Class{i % 200}.{rng.choice(words)}_{rng.choice(nouns)}_{i}"
        python.append(Frame(FrameKind.PYTHON, name, None, 0, file, start + 3, start))
    libraries = [Module(f"/usr/lib/x86_64-linux-gnu/lib{name}.so.1") for name in
                 ("ssl", "crypto", "z", "sqlite3", "ffi", "expat", "yaml", "xml2", "lzma", "bz2", "c", "m")]
    native = [Frame(FrameKind.NATIVE, f"{rng.choice(words)}_{rng.choice(nouns)}_impl{i}", libraries[i % 12],
                    0x10000 + 0x40 * i) for i in range(1500)]
    kernel_module = Module("[kernel.kallsyms]")
    kernel = [Frame(FrameKind.KERNEL, f"__x64_sys_{rng.choice(words)}{i}" if i < 60 else f"kfunc_{i}",
                    kernel_module, 0xFFFFFFFF81000000 + 0x80 * i) for i in range(600)]
    return {FrameKind.PYTHON: python, FrameKind.NATIVE: native, FrameKind.KERNEL: kernel}


def synthetic_profile(samples: int, nodes: int, seed: int = 1) -> Profile:
    """Every one of `nodes` distinct stacks sampled at least once, the rest of the samples
    spread over them with a heavy tail, as real profiles are: a few hot paths, many cold."""
    rng = random.Random(seed)
    pools = function_pools(rng)
    stacks: List[Stack] = [tuple(reversed(START))]
    kernel_depth = [0]
    seen = set()
    while len(stacks) < nodes:
        # Mostly below one of the last few nodes (deep chains), else below any node (breadth).
        parent = len(stacks) - 1 - rng.randrange(min(8, len(stacks))) if rng.random() < 0.85 \
            else rng.randrange(len(stacks))
        stack = stacks[parent]
        kinds, weights = zip(*CALLEES[stack[0].kind])
        kind = rng.choices(kinds, weights)[0]
        depth = kernel_depth[parent] + (kind == FrameKind.KERNEL)
        frame = rng.choice(pools[kind])
        if len(stack) >= MAX_DEPTH or depth > KERNEL_DEPTH or (parent, frame) in seen:
            continue
        seen.add((parent, frame))
        stacks.append((frame,) + stack)
        kernel_depth.append(depth)
    profile = cpu_profile(HZ, start_ns=time.time_ns())
    profile.duration_ns = 10_000_000_000
    threads = [Labels(pid=100 + i, tid=100 + i, comm="app", thread=f"worker-{i}") for i in range(4)]
    weights = [rng.paretovariate(1.1) for _ in stacks]
    chosen = list(range(len(stacks))) + rng.choices(range(len(stacks)), weights, k=samples - len(stacks))
    for i in chosen:
        profile.add(stacks[i], rng.choice(threads), [1, profile.period])
    return profile


def chrome():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise ToolMissing("selenium is missing: sudo scripts/setup --test installs it") from None
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        raise ToolMissing("chromedriver is missing: sudo scripts/setup --test installs chromium and its driver")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


# Runs an event's handler, then waits for the frame that shows its result: the callback of
# requestAnimationFrame runs before that frame is drawn, a task queued from it after.
TIME_EVENT = """
const [target, event, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const started = performance.now();
if (event.type === "input") target.value = event.value;
const box = target.getBoundingClientRect();
target.dispatchEvent(event.type === "click"
    ? new MouseEvent("click", {bubbles: true, clientX: box.left + event.x, clientY: box.top + event.y})
    : new Event("input", {bubbles: true}));
const handled = performance.now() - started;
requestAnimationFrame(() => setTimeout(() => done([handled, performance.now() - started])));
"""


def time_event(driver, target, event: dict) -> Tuple[float, float]:
    return tuple(driver.execute_async_script(TIME_EVENT, target, event))


def medians(times: List[Tuple[float, float]]) -> str:
    handled, shown = zip(*times)
    return f"handler {statistics.median(handled):.1f} ms, to next frame {statistics.median(shown):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=20_000, help="distinct stacks, so call-tree nodes")
    parser.add_argument("--keep", help="write the page here rather than to a temporary file")
    args = parser.parse_args()

    started = time.monotonic()
    profile = synthetic_profile(args.samples, args.nodes)
    made = time.monotonic() - started
    driver = chrome()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(args.keep or Path(tmp) / "flamegraph.html").absolute()
            started = time.monotonic()
            write_flamegraph(profile, str(path))
            written = time.monotonic() - started
            paints = []
            for _ in range(args.runs):
                driver.get(path.as_uri())
                paints.append(driver.execute_script("return window.flamegraphFirstPaintMs"))
            tree, functions, depth = driver.execute_script(
                "const data = JSON.parse(document.getElementById('profile-data').textContent);"
                "const frames = window.flamegraph.frames();"
                "return [data.tree.length / 4, data.functions.length, Math.max(...frames.map(f => f.depth))];")
            print(f"profile: {profile.num_samples()} samples, {tree} nodes, {functions} functions, "
                  f"drawn {depth + 1} deep; made in {made:.1f} s, written in {written:.2f} s")
            print(f"page: {path.stat().st_size / 1e6:.2f} MB")
            print(f"first paint: median {statistics.median(paints):.0f} ms "
                  f"(min {min(paints):.0f}, max {max(paints):.0f}) over {args.runs} loads")

            canvas = driver.find_element("id", "canvas")
            frames = driver.execute_script("return window.flamegraph.frames()")
            target = max((f for f in frames if f["depth"] == 6), key=lambda f: f["width"])
            zoom_in, zoom_out = [], []
            for _ in range(args.runs):
                click = {"type": "click", "x": target["x"] + target["width"] / 2, "y": target["y"] + 9}
                zoom_in.append(time_event(driver, canvas, click))
                root = driver.find_element("css selector", "#breadcrumb button")
                zoom_out.append(time_event(driver, root, {"type": "click", "x": 1, "y": 1}))
            print(f"zoom into {target['name']} ({100 * target['total'] / tree_total(frames):.1f}%): {medians(zoom_in)}")
            print(f"zoom out to all: {medians(zoom_out)}")

            search = driver.find_element("id", "search")
            found, cleared = [], []
            for _ in range(args.runs):
                found.append(time_event(driver, search, {"type": "input", "value": "parse"}))
                cleared.append(time_event(driver, search, {"type": "input", "value": ""}))
            share = driver.execute_script(
                "const box = document.getElementById('search'); box.value = 'parse';"
                "box.dispatchEvent(new Event('input')); return document.getElementById('matched').textContent;")
            print(f"search 'parse' ({share}): {medians(found)}")
            print(f"clear search: {medians(cleared)}")
    finally:
        driver.quit()


def tree_total(frames: List[dict]) -> float:
    return next(f["total"] for f in frames if f["depth"] == 0)


if __name__ == "__main__":
    run_main(main, "flamegraph_paint")
