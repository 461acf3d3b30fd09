"""What people read: `trace` (a run's JSON Lines trace, written as it runs), `text` (summary,
statistics, profiling advice), `html` (the HTML report of a trace), `progress` (the bar).
"""
