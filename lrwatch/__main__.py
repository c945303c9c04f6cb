from lrwatch.cli import main

main(prog_name="lrwatch")
