from crifs.cli.main import run

run()
