import sys


def run() -> int:
    """The console entry point: a Ctrl-C while the heavy imports load is one line and status 130 too."""
    try:
        from e2ediff.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
