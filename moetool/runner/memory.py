"""Process memory: give freed heap memory back to the operating system."""


def release_heap() -> None:
    """Give freed memory back to the OS (glibc keeps freed mid-size blocks otherwise, and a
    streamed run would creep upwards layer by layer)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
