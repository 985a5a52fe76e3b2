"""`python -m trainer` is the `hooktrain` command (and what torchrun launches with `-m trainer`)."""

from trainer.cli import main

if __name__ == "__main__":
    main()
