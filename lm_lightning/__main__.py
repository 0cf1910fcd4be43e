from lm_lightning.cli import main

main()
