"""How long a test waits for a subprocess, a server or a file before calling it hung.

These limits guard against hangs only, never against a slow machine: no test may fail because this machine
is busier or slower than another of its kind. The slowest subprocess seen in the suite took 502 s (the
2-host training, on a busy 2-core machine), the slowest emulator start about 10 s; the limits sit far above.
"""

# A command line, a training or an export run in a subprocess.
SUBPROCESS_S = 3600
# A local server (the Cloud Storage emulator) to answer or start.
SERVER_S = 600
