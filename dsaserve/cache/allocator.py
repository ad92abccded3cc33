"""Page allocator for the paged caches (rank 0 owns it; workers only see the resulting slot ids)."""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """A free list of page ids. Page 0.. num_pages-1; a request holds a list of pages (its block table)."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

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
            pages.append(self._free.pop())

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()
