from weightless_cli.cli import main

main()
