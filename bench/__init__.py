"""tokserve's benchmark: in-process ceiling, the served models under closed-loop load, the cache.

``python -m bench.run`` (``make bench``) starts the server itself and writes
bench/results/<date>-<host>.json, a PNG plot and a Markdown table next to it.
"""
