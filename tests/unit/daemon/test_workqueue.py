"""The work queue: pure, driven with plain numbers."""

from __future__ import annotations

from ovs_ipsec.daemon.workqueue import UNREACHABLE_RETRY, Work, WorkQueue


def test_the_first_take_is_a_full_comparison_then_one_per_interval():
    queue = WorkQueue(resync_interval=60)
    assert queue.take(100).full
    assert not queue.take(101).full and queue.next_deadline() == 160
    assert queue.take(160).full


def test_dirty_keys_are_taken_once():
    queue = WorkQueue(60)
    queue.take(0)
    queue.add({"a", "b"})
    assert queue.has_work(1) and queue.take(1) == Work(False, frozenset({"a", "b"}))
    assert not queue.has_work(1) and queue.take(1).keys == frozenset()


def test_a_failing_key_waits_longer_each_time_up_to_the_cap_and_progress_resets_it():
    queue = WorkQueue(60, base=2, cap=10)
    assert [queue.failed("a", 0) for _ in range(5)] == [2, 4, 8, 10, 10]
    assert queue.not_before["a"] == 10
    assert "a" not in queue.take(9.9).keys and "a" in queue.take(10).keys
    queue.reset("a")
    assert queue.failed("a", 20) == 2


def test_takeovers_come_due_with_their_key():
    queue = WorkQueue(60)
    queue.take(0)
    queue.schedule_takeovers(["r1", "r2"], at=3)
    queue.cancel_takeover("r2")
    assert queue.next_deadline() == 3
    assert queue.take(3) == Work(False, frozenset({"r1"}), frozenset({"r1"}))


def test_requeue_retries_the_keys_and_the_full_comparison_with_backoff():
    queue = WorkQueue(60)
    queue.take(0)
    work = Work(True, frozenset({"a"}))
    assert queue.requeue(work, 10) == 2
    assert queue.next_deadline() == 12 and not queue.has_work(11)
    assert queue.take(12) == Work(True, frozenset({"a"}))
    queue.requeue(Work(True, frozenset()), 12)
    assert queue.next_deadline() == 16  # the full comparison's own backoff grew
    queue.resynced()
    queue.requeue(Work(True, frozenset()), 16)
    assert queue.next_deadline() == 18  # and starts afresh after a success


def test_an_unreachable_daemon_brings_the_full_comparison_forward():
    queue = WorkQueue(60)
    queue.take(0)
    queue.unreachable(1)
    assert queue.next_deadline() == 1 + UNREACHABLE_RETRY
