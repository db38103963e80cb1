"""The ``perpair`` program: the console script and ``python -m perpair``.

It chooses the memory allocator first (:mod:`perpair.allocator`), re-executing itself under it before the
command line's modules are imported, so those imports (about 0.7 s) run once, in the process that does the
work; then it runs the command line.
"""

import sys


def main() -> None:
    from perpair.allocator import reexec_with_allocator
    from perpair.errors import PerpairError

    try:
        reexec_with_allocator([sys.executable, *sys.orig_argv[1:]])
    except PerpairError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    from perpair.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
