"""What the executor and its workers (and the zygote) say to each other: the framing, the kinds
of the executor's frames, the workers' replies and the zygote's requests and answers. Standard
library only: the worker's own script (`_launch.worker_main`) imports it at start-up, the
executor's side (`_call`, `_launch.pool`, `_launch.zygote`, `_engine.executor`) from here too,
so that each word is written once."""

import struct

# Worker pipes: frames both ways are an 8-byte big-endian length and a body; the executor's
# bodies are one kind byte and a pickle.
HEADER = struct.Struct("!Q")
CALL, CHUNK, INIT = b"c", b"m", b"i"
READY = "ready"  # the worker's first reply, once prepared: calls' timeouts start from here
# Replies: the first item says what happened.
OK = "ok"  # the value is pickled in the second item
RAISED = "raised"  # the exception (pickled, or None if it could not be) and its traceback text
UNPICKLED = "unpickled"  # the call could not be unpickled here: message, traceback text
UNPICKLABLE = "unpicklable"  # the return value could not be pickled: message
BROKEN = "broken"  # the worker could not be prepared (main module, initializer): traceback text

PREPARING = "_MPMSUB_WORKER_PREPARING"  # in the environment while a worker imports the main module

# The zygote's socket: one request or answer per SOCK_SEQPACKET message.
FORK, REAP = b"f", b"r"
ZYGOTE_READY, NOFORK, ZYGOTE_BROKEN, FORKED, FAILED, STATUS = b"R", b"N", b"B", b"p", b"e", b"s"
PID = struct.Struct("!q")
MESSAGE_LIMIT = 32768  # a BROKEN or FAILED text is cut to this many bytes
REQUEST_LIMIT = 1 << 17  # a FORK's environment larger than this is not sent (the zygote's is used)
