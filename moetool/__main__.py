from moetool.cli.app import main

main()
