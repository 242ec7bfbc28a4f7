"""A small Flask app with one slow endpoint, for bpfprof's demo (see README.md).

Three handlers each do pure-Python CPU work of very different cost:
calc1 is cheap, calc2 costs about 5 times as much, calc3 about 25 times as much.
`/` calls all three, so a profile of the app under load shows calc3 on top.

Run it with `python app.py` (PORT from the environment, default 5000).
"""

import os

from flask import Flask

app = Flask(__name__)


def calc1(n=20_000):
    """Cheap: a sum of squares."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def calc2(n=100_000):
    """About 5 times calc1: a sum with a branch and a modulo."""
    total = 0
    for i in range(n):
        if i % 3 == 0:
            total += i
        else:
            total -= i % 7
    return total


def calc3(n=500_000):
    """About 25 times calc1: the bottleneck. A running hash over many integers."""
    h = 0
    for i in range(n):
        h = (h * 31 + i) % 1_000_003
    return h


@app.route("/calc1")
def calc1_endpoint():
    return {"calc1": calc1()}


@app.route("/calc2")
def calc2_endpoint():
    return {"calc2": calc2()}


@app.route("/calc3")
def calc3_endpoint():
    return {"calc3": calc3()}


@app.route("/")
def index():
    return {"calc1": calc1(), "calc2": calc2(), "calc3": calc3()}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
