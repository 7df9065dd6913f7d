"""A small seeded fuzz run (tests/fuzz.py): mutated files load and run correctly or raise a named
engine error; never a crash, a hang, a MemoryError or a leaked library exception."""
from tests.fuzz import run


def test_fuzz_ci(capsys):
    counts = run(files=150, seed=0, time_budget=120, timeout=30)
    with capsys.disabled():
        print("\n" + counts.summary())
    assert counts.tried >= 100, counts.summary()
    assert (counts.crashes, counts.hangs, counts.leaks, counts.memory, counts.wrong) == (0, 0, 0, 0, 0), \
        counts.summary()
    assert counts.ok and counts.refused, counts.summary()
