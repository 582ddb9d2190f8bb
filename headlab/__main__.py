"""`python -m headlab ...`: the `headlab` command line, so that launchers that take a module run it
(`torchrun --nproc-per-node 2 -m headlab capture ...`, `accelerate launch -m headlab capture ...`)."""

from headlab.cli import main

if __name__ == "__main__":
    main()
