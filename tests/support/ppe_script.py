"""A ProcessPoolExecutor-style script, run unchanged with its executor class given on the command
line (`module:Class`): submit, map with chunksize, as_completed, wait, an exception in a function,
a lambda that cannot be pickled. It prints what happened, to compare the two executors' output."""

import importlib
import sys
from concurrent.futures import FIRST_EXCEPTION, as_completed, wait


def cube(x):
    return x**3


def divide(a, b):
    return a / b


def describe(exc):
    cause = exc.__cause__
    traced = cause is not None and "divide" in str(cause) and "ZeroDivisionError" in str(cause)
    return f"{type(exc).__name__}: {exc} (traceback attached: {traced})"


def main(Executor):
    with Executor(max_workers=2) as ex:
        print("submit:", ex.submit(cube, 3).result())
        print("map:", list(ex.map(cube, range(10))))
        print("map chunksize:", list(ex.map(divide, range(20), [2] * 20, chunksize=7)))
        futures = {ex.submit(cube, i): i for i in range(8)}
        print("as_completed:", sorted((futures[f], f.result()) for f in as_completed(futures)))
        failing = ex.submit(divide, 1, 0)
        done, _ = wait([ex.submit(cube, 2), failing], return_when=FIRST_EXCEPTION)
        print("wait:", failing in done, type(failing.exception()).__name__)
        try:
            ex.submit(divide, 1, 0).result()
        except ZeroDivisionError as exc:
            print("exception:", describe(exc))
        try:
            list(ex.map(divide, [1, 2], [1, 0], chunksize=2))
        except ZeroDivisionError as exc:
            print("exception in map:", describe(exc))
        try:
            ex.submit(lambda: 1).result()
        except Exception as exc:
            import pickle

            print("lambda:", isinstance(exc, (pickle.PicklingError, AttributeError, TypeError)))
        print("still works:", ex.submit(cube, 4).result())


if __name__ == "__main__":
    module, name = sys.argv[1].split(":")
    main(getattr(importlib.import_module(module), name))
