"""The `xqsim` console script: a Ctrl-C while the command line interface loads (numpy, pandas, typer) ends as one
later does, with one line and exit code 130, not a traceback; once the command has finished, its results written,
a Ctrl-C during the interpreter's shutdown (torch's and Triton's exit handlers take a few tenths of a second) is
ignored rather than killing the process without a word."""

import signal
import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("xqsim: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":  # python -m xqsim.entry, as the console script
    main()
