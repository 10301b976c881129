"""`infdit serve`: jobs that outlive the server (`jobs`, no web dependency) behind an HTTP API and a web
page (`app`, FastAPI: the optional extra `infdit[serve]`)."""
