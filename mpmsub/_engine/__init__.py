"""The executor: its public face (`executor`), the loop thread's core (`core`: job states,
dispatch, a run's end, stops, close), the event loop (`loop`), the monitor thread (`monitor`),
futures (`future`), and what goes back to the caller (`outcome`, `delivery`).
"""
