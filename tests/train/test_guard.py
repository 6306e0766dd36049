"""The non-finite step guard: what counts as finite, the streak, and where it stops and what it says."""

import pytest


def test_guard_finite_needs_both_loss_and_gradient_finite():
    from hybridlm.train.guard import NonFiniteGuard

    inf, nan = float("inf"), float("nan")
    cases = [(1.0, 2.0, True), (inf, 2.0, False), (1.0, nan, False), (-inf, nan, False)]
    assert [NonFiniteGuard.finite(loss, g) for loss, g, _ in cases] == [ok for *_, ok in cases]


def test_guard_counts_skipped_steps_and_resets_the_streak_on_a_finite_one():
    from hybridlm.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=2)
    for step, finite in enumerate([False, True, False, True, False], start=1):
        guard.record(step, finite)  # never 2 in a row: no stop
    assert (guard.skipped, guard.in_a_row) == (3, 1)


def test_guard_stops_at_the_limit_naming_the_streak_and_the_checkpoint_before_it():
    from hybridlm.errors import TrainingDivergedError
    from hybridlm.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=3)
    asked = []

    def before(first):
        asked.append(first)
        return "runs/x/checkpoints/step-000002"

    guard.record(1, False, before)
    guard.record(2, True, before)
    guard.record(3, True, before)
    guard.record(4, False, before)
    guard.record(5, False, before)
    assert asked == []  # looked up only when it stops
    with pytest.raises(TrainingDivergedError) as e:
        guard.record(6, False, before)
    assert asked == [4]
    message = str(e.value)
    assert message.startswith(
        "training diverged: the loss or gradient was not finite at steps 4-6 (3 in a row, "
        "train.max_nonfinite_steps = 3); stopped at step 6 without saving; the last checkpoint before them is "
        "runs/x/checkpoints/step-000002 (lower optim.lr"
    ), message
    assert guard.skipped == 4


def test_guard_without_a_checkpoint_before_the_streak_says_to_start_again():
    from hybridlm.errors import TrainingDivergedError
    from hybridlm.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=1)
    with pytest.raises(TrainingDivergedError, match=r"at steps 1-1 \(1 in a row, .*; no checkpoint precedes them"):
        guard.record(1, False)
