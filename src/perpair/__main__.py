from perpair.cli import main

main()
