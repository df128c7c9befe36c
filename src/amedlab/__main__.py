from amedlab.cli import main

main()
