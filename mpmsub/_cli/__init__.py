"""The `mpmsub` command: `main` (argument parsing and the commands), `jobfile` (text and JSON
Lines job files), `template` (GNU parallel's command templates and input sources), `joblog`
(GNU parallel's joblog and resume), `halt` (`--halt`), `control` (the run's control socket, and
`mpmsub ps` and `mpmsub kill`, which ask it).
"""
