"""Store interfaces shared by the services, each with an embedded default and a production backend."""
