from infdit_cli.cli.app import main

main()
