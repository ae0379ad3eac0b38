"""``python -m simulations.one_shot``: see `simulations.one_shot.cli`."""

from simulations.one_shot.cli import main

if __name__ == "__main__":
    main()
