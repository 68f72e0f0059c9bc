from samft.cli import main

main()
