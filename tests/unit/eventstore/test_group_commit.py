"""Group commit in the event recorder: saves that meet share a transaction, each gets its
own notification ids or its own error, and no transaction holds two saves of one aggregate."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from chatbot.eventstore.group_commit import GroupCommit
from chatbot.eventstore.keys import DataErased
from chatbot.runtime.postgres import WriteTimeout
from tests.waiting import eventually


def events(originator: UUID, *versions: int) -> list[StoredEvent]:
    return [StoredEvent(originator_id=originator, originator_version=v, topic="t", state=b"") for v in versions]


class FakeStore:
    """Commits like the table: a unique (originator, version), ids in insert order; each
    commit takes a while, so saves that arrive meanwhile queue up."""

    def __init__(self, commit_s: float = 0.02) -> None:
        self.rows: set[tuple[UUID, int]] = set()
        self.transactions: list[list[StoredEvent]] = []
        self.next_id = 1
        self.commit_s = commit_s
        self.erased: set[UUID] = set()
        self.lock = threading.Lock()

    def commit(self, batch: Sequence[StoredEvent]) -> list[int]:
        with self.lock:  # the table lock
            time.sleep(self.commit_s)
            keys = [(e.originator_id, e.originator_version) for e in batch]
            if len(set(keys)) < len(keys) or self.rows & set(keys):
                raise IntegrityError("duplicate key value violates unique constraint")
            for e in batch:
                if e.originator_id in self.erased:
                    raise DataErased(e.originator_id)
            self.rows |= set(keys)
            self.transactions.append(list(batch))
            ids = list(range(self.next_id, self.next_id + len(batch)))
            self.next_id += len(batch)
            return ids


def run_concurrently(group: GroupCommit, saves: list[list[StoredEvent]]) -> list[Sequence[int] | BaseException]:
    results: list[Sequence[int] | BaseException] = [() for _ in saves]
    start = threading.Barrier(len(saves))

    def save(i: int) -> None:
        start.wait()
        try:
            results[i] = group.insert(saves[i]) or ()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            results[i] = e

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(saves))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_a_lone_save_commits_at_once_in_its_own_transaction() -> None:
    store = FakeStore(commit_s=0)
    group = GroupCommit(store.commit)
    assert group.insert(events(uuid4(), 1, 2)) == [1, 2]
    assert len(store.transactions) == 1


def test_saves_that_meet_share_transactions_and_each_gets_its_own_ids() -> None:
    store = FakeStore()
    group = GroupCommit(store.commit)
    saves = [events(uuid4(), 1, 2) for _ in range(20)]
    results = run_concurrently(group, saves)
    assert len(store.transactions) < 20, "saves waiting for a commit go in together"
    all_ids = []
    for save, ids in zip(saves, results):
        assert not isinstance(ids, BaseException), ids
        assert len(ids) == len(save) and list(ids) == sorted(ids), "a save's events keep their order"
        all_ids += ids
    assert sorted(all_ids) == list(range(1, 41)), "every event has one id, none twice"
    stored = {(e.originator_id, e.originator_version): i for tx in store.transactions for i, e in enumerate(tx)}
    assert len(stored) == 40


def test_two_saves_of_one_aggregate_never_share_a_transaction_and_the_loser_gets_its_conflict() -> None:
    store = FakeStore()
    group = GroupCommit(store.commit)
    contested = uuid4()
    saves = [events(contested, 3)] * 2 + [events(uuid4(), 1) for _ in range(8)]
    results = run_concurrently(group, saves)
    for tx in store.transactions:
        originators = [e.originator_id for e in tx]
        assert len(originators) == len(set(originators)), "one save per aggregate in a transaction"
    outcomes = results[:2]
    assert sum(isinstance(o, IntegrityError) for o in outcomes) == 1, "exactly one of the two races loses"
    assert all(not isinstance(r, BaseException) for r in results[2:]), "the others are not affected"


def test_a_batch_spoilt_by_one_save_is_retried_save_by_save() -> None:
    store = FakeStore()
    taken, erased = uuid4(), uuid4()
    store.rows.add((taken, 1))  # another process saved version 1 first
    store.erased.add(erased)
    group = GroupCommit(store.commit)
    saves = [events(uuid4(), 1) for _ in range(6)] + [events(taken, 1), events(erased, 2)]
    results = run_concurrently(group, saves)
    assert isinstance(results[6], IntegrityError)
    assert isinstance(results[7], DataErased)
    assert all(not isinstance(r, BaseException) and len(r) == 1 for r in results[:6]), results


def test_a_database_failure_is_every_member_s_answer() -> None:
    class Down(Exception):
        pass

    def commit(batch: Sequence[StoredEvent]) -> list[int]:
        time.sleep(0.01)
        raise Down("the server closed the connection")

    results = run_concurrently(GroupCommit(commit), [events(uuid4(), 1) for _ in range(5)])
    assert all(isinstance(r, Down) for r in results)


def test_a_batch_holds_at_most_max_events_but_a_bigger_save_still_goes() -> None:
    store = FakeStore()
    group = GroupCommit(store.commit, max_events=4)
    saves = [events(uuid4(), 1, 2, 3) for _ in range(6)] + [events(uuid4(), *range(1, 11))]
    results = run_concurrently(group, saves)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert all(len(tx) <= 4 or len(tx) == 10 for tx in store.transactions)


@pytest.mark.parametrize("threads", [2, 16])
def test_group_commit_never_loses_a_save_under_contention(threads: int) -> None:
    store = FakeStore(commit_s=0.001)
    group = GroupCommit(store.commit)
    originators = [uuid4() for _ in range(3)]
    versions = {o: 0 for o in originators}
    lock = threading.Lock()
    outcomes: list[bool] = []

    def worker(n: int) -> None:
        for i in range(30):
            o = originators[(n + i) % len(originators)]
            with lock:
                v = versions[o] + 1
            try:
                group.insert(events(o, v))
                with lock:
                    versions[o] = max(versions[o], v)
                outcomes.append(True)
            except IntegrityError:
                outcomes.append(False)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert len(outcomes) == threads * 30, "every save got an answer"
    assert sum(outcomes) == len(store.rows), "a save that succeeded is stored, one that lost is not"
    for o in originators:
        stored = sorted(v for (oid, v) in store.rows if oid == o)
        assert stored == list(range(1, len(stored) + 1)), "versions without gaps or doubles"


def test_a_batch_holds_at_most_max_bytes_so_big_saves_go_one_by_one() -> None:
    store = FakeStore()
    group = GroupCommit(store.commit, max_bytes=1000)
    big = [[StoredEvent(originator_id=uuid4(), originator_version=1, topic="t", state=bytes(600))] for _ in range(6)]
    results = run_concurrently(group, big)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert all(sum(len(e.state) for e in tx) <= 1000 for tx in store.transactions)
    assert len(store.transactions) == 6


def test_a_save_queued_behind_a_stuck_commit_gives_up_in_time_and_saves_nothing() -> None:
    release = threading.Event()
    store = FakeStore(commit_s=0)
    calls: list[int] = []

    def commit(batch: Sequence[StoredEvent]) -> list[int]:
        calls.append(len(batch))
        if len(calls) == 1:
            release.wait(10)  # the first commit hangs (a lock held elsewhere)
        return store.commit(batch)

    group = GroupCommit(commit, wait_s=0.3)
    first: list[object] = []
    leader = threading.Thread(target=lambda: first.append(group.insert(events(uuid4(), 1))))
    leader.start()
    eventually(lambda: calls, timeout=10, interval=0.01, what="the first commit under way")
    queued = uuid4()
    started = time.monotonic()
    with pytest.raises(WriteTimeout, match="nothing was saved"):
        group.insert(events(queued, 1))
    assert 0.3 <= time.monotonic() - started < 2, "the wait is bounded"
    release.set()
    leader.join(10)
    assert first == [[1]], "the stuck commit still gets its own answer"
    assert all(oid != queued for oid, _ in store.rows), "the save that gave up was never run"
    assert group.insert(events(uuid4(), 1)) == [2], "and the store takes saves again"
