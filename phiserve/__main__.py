from phiserve.cli import app

app()
