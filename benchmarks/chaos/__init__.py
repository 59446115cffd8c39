"""The chaos soak (issue 11): ``python -m benchmarks.chaos --minutes N [--seed S]
[--topology single|sentinel|cluster]``.

Many coordinators loop waits over the channels of several swarms, in worker processes
(``worker``) and in the soak's own process, while publishers send at a steady rate, some
waiting for ACKs (``workload``). A seeded schedule (``plan``) injects faults: coordinator
processes killed (SIGKILL, restarted under the same ids) and frozen (SIGSTOP/SIGCONT), waits
cancelled, the server killed and restarted from its ``appendfsync always`` AOF or frozen,
masters failed over (``servers``), links cut in a network namespace, clocks skewed with
libfaketime. Every coordinator journals what its waits returned (``journal``,
``coordinator``); at the end the soak reads what Redis recorded (``soak``) and the checker
(``history``) holds the whole history against the delivery contract. ``__main__`` prints the
table and exits non-zero on any violation.
"""
