"""``python -m xraytwisted``: the same as the ``xray`` command."""

from xraytwisted.command import run

if __name__ == "__main__":
    run()
