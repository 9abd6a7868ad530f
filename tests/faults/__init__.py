"""Fault-injection safety harness (issue 6): Jepsen-style lock-set runs under faults."""
