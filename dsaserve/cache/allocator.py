"""Page allocator for the paged caches (rank 0 owns it; workers only see the resulting slot ids).

Pages are reference-counted: the ``n`` sequences of one request share the prompt's full pages (``share``),
and a page returns to the free list when the last table holding it is freed.
"""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """A free list of page ids. Page 0.. num_pages-1; a request holds a list of pages (its block table)."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def grow(self, pages: list[int], new_len: int) -> None:
        """Extend ``pages`` in place so it can hold ``new_len`` tokens."""
        need = self.pages_needed(new_len) - len(pages)
        if need > len(self._free):
            raise OutOfPagesError(f"need {need} more KV pages, {len(self._free)} free")
        for _ in range(max(need, 0)):
            page = self._free.pop()
            self._refs[page] = 1
            pages.append(page)

    def share(self, pages: list[int]) -> list[int]:
        """Another table holding the same ``pages`` (each gains a reference); returns the new table."""
        for p in pages:
            if self._refs[p] < 1:
                raise ValueError(f"page {p} is not allocated: it cannot be shared")
            self._refs[p] += 1
        return list(pages)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def free(self, pages: list[int]) -> None:
        """Drop one table's reference to each of its pages; pages nobody holds any more become free."""
        released = []
        for p in pages:
            if self._refs[p] < 1:
                raise ValueError(f"page {p} is freed more often than it was allocated")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                released.append(p)
        self._free.extend(reversed(released))
        pages.clear()
