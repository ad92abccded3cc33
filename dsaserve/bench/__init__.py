"""``dsaserve bench``: benchmarks of a running engine. ``cli`` dispatches to one module per benchmark
(``prefill``: TTFT per PP x CP layout); ``report`` holds the pure arithmetic and tables."""
