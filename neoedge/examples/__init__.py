"""Small programs that show how an app embeds neoedge (run them with `python -m neoedge.examples.NAME`)."""
