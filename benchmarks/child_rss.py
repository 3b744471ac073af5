"""Peak RSS of a benchmark's child process, measured by the child itself.

``PEAK_RSS_FUNCTION`` is source text the benchmarks put into the scripts they run with ``python -c``: it defines
``peak_rss()`` (bytes), the ``VmHWM`` of the child's own address space. Not ``ru_maxrss``: Linux carries the
forking parent's high-water mark into the child's ``ru_maxrss`` across ``execve``, so a child started from a
process that had grown to 2 GiB (pytest after the graph fixtures) reported 2 GiB for a tiny run.
"""

PEAK_RSS_FUNCTION = """
def peak_rss():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
