"""The KV page allocator on its own (rank 0 hands out the page ids every rank uses)."""

from __future__ import annotations

import pytest

from dsaserve.cache.allocator import OutOfPagesError, PageAllocator


def test_pages_needed_rounds_up():
    a = PageAllocator(num_pages=8, page_size=4)
    assert [a.pages_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_grow_appends_only_the_missing_pages_lowest_ids_first():
    a = PageAllocator(num_pages=8, page_size=4)
    table: list[int] = []
    a.grow(table, 5)
    assert table == [0, 1] and a.num_free == 6
    a.grow(table, 8)                                  # still fits in 2 pages: nothing new
    assert table == [0, 1] and a.num_free == 6
    a.grow(table, 9)
    assert table == [0, 1, 2] and a.num_free == 5
    other: list[int] = []
    a.grow(other, 4)
    assert other == [3]                               # two tables never share a page
    a.grow(table, 3)                                  # shrinking is not a thing: the table stays
    assert table == [0, 1, 2]


def test_out_of_pages_allocates_nothing():
    a = PageAllocator(num_pages=3, page_size=4)
    table: list[int] = []
    a.grow(table, 8)
    with pytest.raises(OutOfPagesError, match="need 2 more KV pages, 1 free"):
        a.grow(table, 16)
    assert table == [0, 1] and a.num_free == 1        # no partial growth


def test_free_returns_pages_for_reuse_and_clears_the_table():
    a = PageAllocator(num_pages=4, page_size=2)
    t1, t2 = [], []
    a.grow(t1, 6)
    a.grow(t2, 2)
    assert (t1, t2, a.num_free) == ([0, 1, 2], [3], 0)
    a.free(t1)
    assert t1 == [] and a.num_free == 3
    t3: list[int] = []
    a.grow(t3, 6)
    assert t3 == [0, 1, 2]                            # freed pages come back in their table order
    a.free(t2)
    a.free(t3)
    assert a.num_free == 4


def test_shared_pages_are_freed_by_their_last_holder():
    a = PageAllocator(num_pages=6, page_size=4)
    parent: list[int] = []
    a.grow(parent, 10)                                # pages 0, 1, 2 (the last one partly filled)
    child = a.share(parent[:2])                       # the full pages are shared ...
    a.grow(child, 10)                                 # ... and the child gets its own third page
    assert child == [0, 1, 3] and [a.refs(p) for p in range(4)] == [2, 2, 1, 1] and a.num_free == 2
    a.free(parent)
    assert a.num_free == 3 and [a.refs(p) for p in range(4)] == [1, 1, 0, 1]   # only page 2 came back
    a.free(child)
    assert a.num_free == 6
    with pytest.raises(ValueError, match="freed more often"):
        a.free([0])
    with pytest.raises(ValueError, match="not allocated"):
        a.share([5])
