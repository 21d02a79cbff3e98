"""`chameleon demo` and the launcher that runs `chameleon serve` as a child process (used by the demo,
the tests and the benchmarks)."""
