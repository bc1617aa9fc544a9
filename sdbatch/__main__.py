from sdbatch.cli import main

main()
