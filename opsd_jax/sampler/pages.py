"""Host-side bookkeeping of the KV page pool: which pages are free and how many holders each has
(n samples of one prompt share its full pages)."""

from __future__ import annotations

from opsd_jax.models.paged import NULL_PAGE


class PageAllocator:
    """Reference-counted pages 1 .. num_pages - 1 (page 0 is the null page, never handed out)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low pages first
        self._holders = [0] * num_pages
        self.peak_in_use = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh pages with one holder each, or None (and nothing taken) if too few are free."""
        if count > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._holders[page] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return pages

    def retain(self, pages) -> None:
        for page in pages:
            if self._holders[page] < 1:
                raise ValueError(f"page {page} is not allocated")
            self._holders[page] += 1

    def release(self, pages) -> None:
        """Drops one holder of each page; a page with none left is free again."""
        for page in pages:
            if self._holders[page] < 1:
                raise ValueError(f"page {page} released more often than held")
            self._holders[page] -= 1
            if self._holders[page] == 0:
                self._free.append(page)
